"""Token logs are named by the launch, the same on every rank and node, never by a process id."""

from __future__ import annotations

from lmms_eval_redundancy.lmms.ledger import launch_id

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
