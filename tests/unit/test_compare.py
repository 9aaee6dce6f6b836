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
    assert (rows["tokens after last cut / sample"] == 8).all()  # one run each: nothing summed


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
    assert row["t (exact_match)"] == 0.25 and row["tokens after last cut / sample"] == 8  # the newest run, counts not added
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


def test_both_token_budgets_are_columns_and_match_places_methods_at_equal_layer_mean_or_flops(tmp_path):
    import json
    import math

    runs = [("none", NONE, 16, 16, 1.0), ("a", {"method": "fastv", "budget": "retention=0.25"}, 4, 10, 0.5),
            ("b", {"method": "fastv", "budget": "retention=0.5"}, 8, 12, 0.75),
            ("c", {"method": "pdrop", "budget": "retention=0.5"}, 2, 11, 0.7)]
    for i, (folder, settings, kept, layer_mean, score) in enumerate(runs):
        record_run(tmp_path / folder, f"20260101_00000{i}", settings, {"t": score}, kept=kept)
        tokens_file = tmp_path / folder / f"20260101_00000{i}_tokens.json"
        tokens = json.loads(tokens_file.read_text())
        tokens_file.write_text(json.dumps({**tokens, "visual_tokens_layer_mean": 4 * layer_mean}))
    tables, _ = compare(tmp_path, tmp_path / "compare", match="layer_mean")
    table = tables["tiny"].set_index("run")
    assert table.loc["pdrop retention=0.5", "tokens after last cut / sample"] == 2
    assert table.loc["pdrop retention=0.5", "layer-mean tokens / sample"] == 11
    matched = tables["tiny at equal layer_mean"]
    assert matched["layer-mean tokens / sample"].tolist() == [10, 11, 12]
    assert matched["fastv"].tolist() == [50, 62.5, 75]  # between its runs at 10 and 12: linear
    assert math.isnan(matched["pdrop"][0]) and matched["pdrop"][1] == 70 and math.isnan(matched["pdrop"][2])
    assert (tmp_path / "compare" / "tiny_score_vs_layer_mean.png").is_file()
    assert (tmp_path / "compare" / "tiny_at_equal_layer_mean.md").is_file()
    tables, _ = compare(tmp_path, tmp_path / "flops", match="flops")
    matched = tables["tiny at equal flops"]
    assert matched["FLOPs ratio"].tolist() == [(100 * k + 10) / 1610 for k in (2, 4, 8)]
    assert matched["pdrop"][0] == 70 and matched["fastv"].tolist()[1:] == [50, 75]
