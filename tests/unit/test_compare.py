"""compare keys a row on a run's complete recorded settings: different settings never merge, reruns are duplicates;
run files that do not parse stop it; a speed-up comes with its spread."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import record_run

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.tools.compare import (
    SPEED_UP,
    SPREAD,
    collect,
    compare,
    device_prefill_speed_up,
    readable,
)

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


# ---- files that do not parse, interrupted runs, the speed-up's spread ----------------------------------

def test_a_truncated_results_file_stops_compare_naming_the_file(tmp_path):
    record_run(tmp_path / "a", "20260101_000000", NONE, {"t": 1.0})
    results = tmp_path / "a" / "20260101_000000_results.json"
    results.write_text(results.read_text()[:20])
    with pytest.raises(UserError, match=f"{results}: the results file is truncated or not JSON"):
        compare(tmp_path, tmp_path / "compare")
    assert not (tmp_path / "compare").exists()


def test_an_interrupted_run_is_left_out_with_a_warning(tmp_path):
    record_run(tmp_path / "a", "20260101_000000", NONE, {"t": 1.0})
    record_run(tmp_path / "b", "20260101_000001", random_run(0), {"t": 0.5})
    (tmp_path / "b" / "20260101_000001_results.json").unlink()  # lmms-eval never got to write it
    collected = collect(tmp_path)
    assert list(collected.frame["run"]) == ["none"]
    (warning,) = collected.warnings
    assert warning.startswith("left out ") and "20260101_000001_tokens.json: an interrupted run" in warning


def test_a_missing_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="nowhere does not exist; give the output folder of a sweep"):
        compare(tmp_path / "nowhere")


def row(index: int, device_prefill: dict) -> pd.Series:
    return pd.Series({"timings by document": {key: (seconds, 1.0) for key, seconds in device_prefill.items()}}, name=index)


def test_the_speed_up_is_the_median_of_the_per_document_ratios_with_their_quartiles_flagged_when_they_include_one():
    reference = row(0, {("g", "t", "test", d): 1.0 for d in range(4)})
    steady = row(1, {("g", "t", "test", d): s for d, s in enumerate([0.5, 0.6, 0.5, 0.6])})
    noisy = row(2, {("g", "t", "test", d): s for d, s in enumerate([0.4, 2.0, 0.5, 1.8])})
    assert device_prefill_speed_up(steady, reference).median == pytest.approx((2 + 1 / 0.6) / 2)
    assert device_prefill_speed_up(steady, reference).spread() == "1.67-2"
    noisy_speed_up = device_prefill_speed_up(noisy, reference)
    assert noisy_speed_up.spread() == "0.542-2.12 unreliable" and str(noisy_speed_up) == "1.28 (0.542-2.12) unreliable"
    assert noisy_speed_up.median == pytest.approx((2 + 1 / 1.8) / 2)  # not the ratio of means (4 / 4.7)
    assert device_prefill_speed_up(row(3, {}), reference) is None  # no per-sample records: nothing to show


def test_tables_print_the_speed_up_with_its_spread_and_keep_the_csv_columns_numbers():
    table = pd.DataFrame({"run": ["none", "a", "b"], SPEED_UP: [1.0, 1.78, 0.833],
                          SPREAD: [math.nan, "1.66-1.88", "0.554-1.98 unreliable"]})
    assert list(readable(table)[SPEED_UP]) == ["1", "1.78 (1.66-1.88)", "0.833 (0.554-1.98) unreliable"]
    assert table[SPEED_UP].dtype == float and SPREAD not in readable(table)


def test_speed_columns_leave_out_the_warm_up_and_count_samples_per_second_end_to_end(tmp_path):
    # document 0 is each run's warm-up batch: its outlier times must not count
    record_run(tmp_path / "ref", "20260101_000000", NONE, {"t": 1.0}, kept=16, device_prefill=[50.0, 1.0, 1.2, 0.8, 1.0])
    record_run(tmp_path / "b", "20260101_000001", random_run(0), {"t": 0.5}, device_prefill=[90.0, 0.5, 0.4, 0.4, 0.5])
    tokens_file = tmp_path / "b" / "20260101_000001_tokens.json"
    tokens = json.loads(tokens_file.read_text())
    tokens["efficiency"]["generate_until"]["kv_cache_bytes_per_sample"] = 1024.0
    tokens_file.write_text(json.dumps(tokens))
    table = compare(tmp_path, tmp_path / "compare")[0]["tiny"].set_index("run")
    assert list(table.columns[-5:]) == [SPEED_UP, SPREAD, "samples/s", "FLOPs ratio", "KV-cache bytes / sample"]
    pruned, unpruned = table.loc["random retention=0.5"], table.loc["none"]
    assert pruned[SPEED_UP] == pytest.approx(2.0) and pruned[SPREAD] == "2-2.25"  # ratios 2, 3, 2, 2
    assert pruned["samples/s"] == pytest.approx(4 / (4 * (0.1 + 0.4) + 1.8))  # host + device prefill + decode
    assert unpruned["samples/s"] == pytest.approx(4 / (4 * (0.1 + 0.4) + 4.0))
    assert unpruned[SPEED_UP] == 1.0 and math.isnan(unpruned[SPREAD])
    assert pruned["KV-cache bytes / sample"] == 1024 and math.isnan(unpruned["KV-cache bytes / sample"])  # not recorded


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
