"""Token logs are named by the launch, the same on every rank and node, never by a process id; they go where
lmms-eval writes the run's results."""

from __future__ import annotations

import pytest
import yaml

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.lmms.ledger import launch_id, output_path_from_argv

RENDEZVOUS = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "16"}


def test_every_rank_and_node_of_a_launch_agrees_on_its_name(monkeypatch):
    names = set()
    for node, rank in ((0, 0), (0, 7), (1, 8), (1, 15)):  # different nodes, different parent processes
        for key, value in {**RENDEZVOUS, "RANK": str(rank), "GROUP_RANK": str(node)}.items():
            monkeypatch.setenv(key, value)
        names.add(launch_id(16))
    assert len(names) == 1 and not next(iter(names)).isdigit()
    monkeypatch.setenv("MASTER_PORT", "29501")  # another launch
    assert launch_id(16) not in names


def test_a_single_process_gets_a_fresh_name():
    assert launch_id(1) != launch_id(1)


def test_the_output_path_comes_from_the_command_or_from_this_models_run_in_a_config_list(tmp_path):
    runs = [{"model": "llava_redundancy", "model_args": "pretrained=a", "output_path": "out/a"},
            {"model": "llava_redundancy", "model_args": "pretrained=b", "output_path": "out/b"},
            {"model": "llava_onevision", "model_args": "pretrained=a", "output_path": "out/other"}]
    config = tmp_path / "runs.yaml"
    config.write_text(yaml.safe_dump(runs))
    assert output_path_from_argv(["--model", "x", "--output_path", "given"], "pretrained=a") == "given"
    assert output_path_from_argv(["--config", str(config)], "pretrained=b") == "out/b"
    assert output_path_from_argv(["--config", str(config)], "pretrained=c") is None
    config.write_text(yaml.safe_dump(runs + [{**runs[0], "output_path": "out/a2"}]))
    with pytest.raises(UserError, match="add output_dir=<the run's output_path> to each run's model_args"):
        output_path_from_argv(["--config", str(config)], "pretrained=a")
