"""compare keys a row on a run's complete recorded settings: different settings never merge, reruns are duplicates."""

from __future__ import annotations

from conftest import record_run

from lmms_eval_redundancy.tools.compare import collect, compare

NONE = {"method": "none", "budget": "all"}


def random_run(seed: int) -> dict:
    return {"method": "random", "budget": "retention=0.5", "seed": seed}


def codebook_run(content_id: str, path: str) -> dict:
    return {"method": "codebook", "budget": "threshold=0.5", "codebook": content_id, "variant": "threshold",
            "paths": {"codebook": path}}


def test_runs_differing_only_in_seed_are_two_rows(tmp_path):
    record_run(tmp_path / "a", "20260101_000000", NONE, {"t": 1.0}, kept=16)
    record_run(tmp_path / "b", "20260101_000001", random_run(0), {"t": 0.5})
    record_run(tmp_path / "c", "20260101_000002", random_run(1), {"t": 0.75})
    frame = collect(tmp_path).frame
    rows = frame[frame["method"] == "random"].set_index("run")
    assert sorted(rows.index) == ["random retention=0.5 (seed=0)", "random retention=0.5 (seed=1)"]
    assert rows.loc["random retention=0.5 (seed=0)", "t (exact_match)"] == 0.5
    assert rows.loc["random retention=0.5 (seed=1)", "t (exact_match)"] == 0.75
    assert (rows["retained tokens / sample"] == 8).all()  # one run each: nothing summed


def test_runs_differing_only_in_the_codebook_file_are_two_rows_and_paths_do_not_count(tmp_path):
    record_run(tmp_path / "a", "20260101_000001", codebook_run("cb-1111111111", "/x/cb.safetensors"), {"t": 0.5})
    record_run(tmp_path / "b", "20260101_000002", codebook_run("cb-2222222222", "/x/cb.safetensors"), {"t": 0.6})
    record_run(tmp_path / "c", "20260101_000003", codebook_run("cb-2222222222", "/y/copy.safetensors"), {"u": 0.7})
    frame = collect(tmp_path).frame.set_index("run")
    assert sorted(frame.index) == ["codebook threshold=0.5 (codebook=cb-1111111111)",
                                   "codebook threshold=0.5 (codebook=cb-2222222222)"]
    same_content = frame.loc["codebook threshold=0.5 (codebook=cb-2222222222)"]
    assert (same_content["t (exact_match)"], same_content["u (exact_match)"]) == (0.6, 0.7)  # one row, two tasks


def test_an_identical_rerun_is_reported_as_a_duplicate_not_summed(tmp_path):
    record_run(tmp_path / "ref", "20260101_000000", NONE, {"t": 1.0}, kept=16)
    record_run(tmp_path / "old", "20260101_000001", random_run(0), {"t": 0.5})
    record_run(tmp_path / "new", "20260102_000000", random_run(0), {"t": 0.25})
    tables, duplicates = compare(tmp_path, tmp_path / "compare")
    (table,) = tables.values()
    row = table[table["run"] == "random retention=0.5"].iloc[0]
    assert row["t (exact_match)"] == 0.25 and row["retained tokens / sample"] == 8  # the newest run, counts not added
    assert len(table) == 2
    (duplicate,) = duplicates
    assert "old" in duplicate["run"] and duplicate["tasks"] == ["t (exact_match)"] and "new" in duplicate["kept"][0]


def test_runs_differing_only_in_their_budget_share_a_plot_curve_and_other_settings_do_not(tmp_path):
    for i, (budget, variant) in enumerate([("retention=0.25", "ratio"), ("retention=0.5", "ratio"),
                                           ("threshold=0.5", "threshold"), ("threshold=0.7", "threshold")]):
        settings = {"method": "codebook", "budget": budget, "codebook": "cb-1111111111", "variant": variant}
        record_run(tmp_path / str(i), f"20260101_00000{i}", settings, {"t": 0.5})
    curves = collect(tmp_path).frame.groupby("curve")["run"].apply(sorted).to_dict()
    assert curves == {"codebook (variant=ratio)": ["codebook retention=0.25 (variant=ratio)", "codebook retention=0.5 (variant=ratio)"],
                      "codebook (variant=threshold)": ["codebook threshold=0.5 (variant=threshold)",
                                                       "codebook threshold=0.7 (variant=threshold)"]}
