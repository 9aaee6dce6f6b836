"""The task groups over lmms-eval's own benchmarks parse and name tasks lmms-eval knows (no data is loaded)."""

from __future__ import annotations

import pytest
import yaml

from lmms_eval_redundancy.core.files import product_folder

PAPER = product_folder("tasks") / "paper"
GROUPS = sorted(PAPER.glob("*.yaml"))


@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(PAPER))


@pytest.mark.parametrize("path", GROUPS, ids=lambda p: p.stem)
def test_group_names_only_tasks_lmms_eval_knows(task_manager, path):
    group = yaml.safe_load(path.read_text())
    assert group["group"] == path.stem
    assert group["group"] in task_manager.all_groups
    unknown = [task for task in group["task"] if task not in task_manager.all_tasks]
    assert not unknown, f"{path.name} names tasks lmms-eval 0.7.3 does not have: {unknown}"


def test_paper_groups_cover_the_evaluated_benchmarks():
    named = {task for path in GROUPS for task in yaml.safe_load(path.read_text())["task"]}
    assert {"pope", "mme", "mmbench_en_dev", "seedbench", "gqa", "textvqa_val", "scienceqa_img", "realworldqa",
            "flickr30k_test", "nocaps_val", "muirbench", "mantis", "mvbench", "videomme"} <= named
