"""compare --published: our recorded runs of a real checkpoint beside the shipped published numbers."""

from __future__ import annotations

import json

import pandas as pd
from conftest import record_run

from lmms_eval_redundancy.cli import main
from lmms_eval_redundancy.tools.compare import collect
from lmms_eval_redundancy.tools.published import (
    PUBLISHED,
    load_published,
    metric_keys,
    side_by_side,
    task_map,
)

CHECKPOINT = "llava-hf/llava-1.5-7b-hf"


def record_real_run(folder, stamp, method, budget, kept, pope_f1, mme_perception, mme_cognition):
    record_run(folder, stamp, {"method": method, "budget": budget, "pretrained": CHECKPOINT}, {}, kept=kept)
    results = {"results": {"pope": {"alias": "pope", "pope_accuracy,none": 0.5, "pope_f1_score,none": pope_f1},
                           "mme": {"alias": "mme", "mme_cognition_score,none": mme_cognition,
                                   "mme_perception_score,none": mme_perception}}}
    (folder / f"{stamp}_results.json").write_text(json.dumps(results))


def test_published_rows_stand_beside_ours_never_mixed_in(tmp_path):
    record_real_run(tmp_path / "a", "20260101_000000", "none", "all", 144, 0.8597, 1510.7, 355.7)
    record_real_run(tmp_path / "b", "20260101_000001", "fastv", "tokens=64", 16, 0.5, 1000.0, 200.0)
    tables = side_by_side(collect(tmp_path).frame, load_published(), task_map())
    table, notes = tables["LLaVA-1.5-7B"]
    ours, theirs = table[table["kind"] == "ours"], table[table["kind"] == "published"]
    assert list(ours["run"]) == ["none", "fastv tokens=64"]
    assert ours.iloc[0]["POPE (F1)"] == 100 * 0.8597  # lmms-eval's fraction, as papers print it
    assert ours.iloc[0]["MME (perception score)"] == 1510.7
    assert ours.iloc[0]["MME (perception+cognition score (sum))"] == 1510.7 + 355.7  # two conventions, two columns
    assert set(theirs["run"].str.split().str[0]) == {"LLaVA-1.5-7B", "FastV"}  # only methods we ran
    shipped = pd.read_csv(PUBLISHED)
    fastv_64 = shipped[(shipped["model"] == "LLaVA-1.5-7B") & (shipped["method"] == "FastV")
                       & (shipped["retained_tokens"] == 64) & (shipped["benchmark"] == "POPE")]
    assert set(theirs.loc[theirs["run"].str.startswith("FastV @64"), "POPE (F1)"].dropna()) == set(fastv_64["value"])
    every_source = {n.split("] ", 1)[1] for n in notes if n.startswith("[")}
    assert set(fastv_64["source"]) <= every_source  # each number keeps its source
    assert any(n.startswith("MME:") and "perception" in n for n in notes)  # the conventions are stated


def test_metric_keys_follow_the_reported_convention():
    spec = "mme_perception_score + mme_cognition_score"
    assert metric_keys(spec, "perception score") == ["mme_perception_score"]
    assert metric_keys(spec, "perception+cognition score (sum)") == ["mme_perception_score", "mme_cognition_score"]
    assert metric_keys("pope_f1_score (also pope_accuracy)", "F1") == ["pope_f1_score"]


def test_compare_published_command_writes_the_side_by_side_table(tmp_path, capsys):
    record_real_run(tmp_path / "a", "20260101_000000", "none", "all", 144, 0.8597, 1510.7, 355.7)
    main(["compare", str(tmp_path), "--published"])
    assert "our runs and published numbers" in capsys.readouterr().out
    assert (tmp_path / "compare" / "llava-1.5-7b-hf.md").is_file()  # a dotted model name keeps its whole name
    written = (tmp_path / "compare" / "LLaVA-1.5-7B_published.md").read_text()
    assert "| published" in written and "| ours" in written
    assert (tmp_path / "compare" / "LLaVA-1.5-7B_published.png").is_file()
