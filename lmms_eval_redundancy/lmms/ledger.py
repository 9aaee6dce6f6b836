"""Token accounting: per-sample records streamed to disk per rank, and a run summary.

During a run each process appends one JSON line per sample to ``<dir>/tokens/<launch>/rank<R>.jsonl``
(flushed after every batch, so an interrupted run keeps what it finished). When the process of rank 0
exits, it merges all ranks' records into ``<date>_tokens.json`` next to lmms-eval's
``<date>_results.json``, written atomically: a failed write leaves no file and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import yaml

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.files import write_atomically
from lmms_eval_redundancy.runtime.efficiency import PHASES, Quartiles, after_warm_up


def output_path_from_argv(argv: list[str], model_args: str | None = None) -> str | None:
    """The ``--output_path`` of the running ``lmms_eval`` command, if any; under ``--config`` (a YAML run or list
    of runs) without one, the ``output_path`` of the ``llava_redundancy`` run whose model_args are ``model_args``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--config", default=None)
    given = parser.parse_known_args(argv)[0]
    if given.output_path or not given.config or model_args is None:
        return given.output_path
    runs = yaml.safe_load(Path(given.config).read_text())
    paths = {run.get("output_path") for run in (runs if isinstance(runs, list) else [runs])
             if run.get("model") == "llava_redundancy" and run.get("model_args") == model_args}
    if len(paths) > 1:
        raise UserError(f"{given.config} has several llava_redundancy runs with model_args {model_args!r} and different "
                        "output_path values; add output_dir=<the run's output_path> to each run's model_args")
    return paths.pop() if paths else None


def launch_id(world_size: int) -> str:
    """A name all processes of one launch agree on without communicating, on every node.

    Several processes: a hash of the launcher's rendezvous (run id, master address and port, world size),
    which every rank sees alike. One process: a random name.
    """
    if world_size <= 1:
        return uuid.uuid4().hex[:12]
    rendezvous = ":".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"))
    return hashlib.sha256(rendezvous.encode()).hexdigest()[:12]


def summarize(samples: list[dict]) -> dict:
    """Aggregate per-sample records into the run summary the compare tool reads."""
    units = [u for s in samples for u in s["units"]]
    before = sum(u["before"] for u in units)
    after = sum(u["after"] for u in units)
    per_sample_after = [sum(u["after"] for u in s["units"]) for s in samples if s["units"]]
    retained = [u["after"] for u in units]
    return {
        "samples": len(samples),
        "samples_with_visuals": len(per_sample_after),
        "images": sum(u["kind"] == "image" for u in units),
        "frames": sum(u["kind"] == "frame" for u in units),
        "visual_tokens_before": before,
        "visual_tokens_after": after,
        # methods inside the LLM: visual tokens averaged over decoder layers (``after`` counts those after the last cut)
        "visual_tokens_layer_mean": sum(statistics.fmean(u["layers"]) if u.get("layers") else u["after"] for u in units),
        # LLM prefill FLOPs against the same samples unpruned (analytic; ``runtime.flops``)
        "llm_prefill_flops_ratio": flops_ratio(samples),
        "newline_tokens_before": sum(u["newlines_before"] for u in units),
        "newline_tokens_after": sum(u["newlines_after"] for u in units),
        "achieved_retention": after / before if before else None,
        "retained_per_unit": {
            "mean": statistics.fmean(retained) if retained else None,
            "min": min(retained, default=None),
            "max": max(retained, default=None),
        },
        "retained_per_sample_mean": statistics.fmean(per_sample_after) if per_sample_after else None,
        "floor_hits": sum(bool(u["floor_hit"]) for u in units),
        "efficiency": summarize_efficiency(samples),
    }


def flops_ratio(samples: list[dict]) -> float | None:
    """Summed LLM prefill FLOPs over those of the samples unpruned (None when not recorded)."""
    rows = [s.get("efficiency", {}) for s in samples]
    unpruned = sum(row.get("llm_prefill_flops_unpruned", 0) for row in rows)
    return sum(row.get("llm_prefill_flops", 0) for row in rows) / unpruned if unpruned else None


def summarize_efficiency(samples: list[dict]) -> dict:
    """Per request type: per-sample means of the measured costs (peak memory: the maximum), and under
    ``phases_after_warm_up`` the median and interquartile range of each phase's per-sample seconds after the
    warm-up (``runtime.efficiency.after_warm_up``)."""
    out = {}
    for request in sorted({s["request"] for s in samples}):
        of_request = [s for s in samples if s["request"] == request]
        rows = [s.get("efficiency", {}) for s in of_request]
        keys = sorted({k for row in rows for k in row} - {"batch_size", "batch_index"})
        out[request] = {
            f"{key}_per_sample" if key != "peak_memory_bytes" else key:
            (max if key == "peak_memory_bytes" else statistics.fmean)([row[key] for row in rows if key in row])
            for key in keys
        }
        measured = [s["efficiency"] for s in after_warm_up(of_request)]
        quartiles = {phase: Quartiles.of(row[phase] for row in measured) for phase in PHASES
                     if measured and all(phase in row for row in measured)}
        out[request]["phases_after_warm_up"] = {
            "samples": len(measured),
            **{phase: {"median": q.median, "iqr": [q.low, q.high]} for phase, q in quartiles.items()}}
    return out


class LedgerError(UserError):
    """The token record cannot be written (a full disk, a folder without write permission)."""


class TokenLedger:
    """Collects unit records of one process and writes the run summary at exit (rank 0).

    The log folder appears with the first record, so a run refused before any sample leaves nothing behind.
    """

    def __init__(self, rank: int, world_size: int, results_dir: Path | None, settings: dict):
        self.rank, self.world_size = rank, world_size
        self.results_dir = results_dir
        self.settings = settings
        self.started = time.time()
        self.samples: list[dict] = []
        self.launch = launch_id(world_size)
        self.log_dir = results_dir / "tokens" / self.launch if results_dir else None
        self.discarded = False
        self._stream = None
        self._created: list[Path] = []  # folders this process made for its log, deepest first

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"rank{self.rank}.jsonl"

    @contextlib.contextmanager
    def _writing_log(self):
        """A failed write to this rank's log (a full disk, a read-only folder) as a ``LedgerError``."""
        try:
            yield
        except OSError as err:
            raise LedgerError(f"cannot write the token records to {self.log_file}: {err}; free disk space "
                              "(or make the folder writable) and rerun") from err

    def _open(self) -> None:
        self._created = [p for p in (self.log_dir, *self.log_dir.parents) if not p.exists()]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.log_file, "w", encoding="utf-8")

    def add(self, request: str, task: str, split: str, doc_id: int, records: list, efficiency: dict | None = None) -> None:
        sample = {"request": request, "task": task, "split": split, "doc_id": doc_id,
                  "units": [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in records],
                  "efficiency": efficiency or {}}
        self.samples.append(sample)
        if self.log_dir:
            with self._writing_log():
                if self._stream is None:
                    self._open()
                self._stream.write(json.dumps(sample) + "\n")

    def flush(self) -> None:
        if self._stream:
            with self._writing_log():
                self._stream.flush()

    def _close(self) -> None:
        if self._stream:
            stream, self._stream = self._stream, None
            stream.close()

    def discard(self) -> None:
        """Drop this process's log and the folders made for it, and write no summary (a refused run)."""
        self.discarded = True
        with contextlib.suppress(OSError):
            self._close()
        if self.log_dir:
            self.log_file.unlink(missing_ok=True)
            for folder in self._created:
                with contextlib.suppress(OSError):  # left when other ranks' logs are still in it
                    folder.rmdir()

    def _all_samples(self) -> list[dict]:
        """Every rank's records (read back from the per-rank streams)."""
        samples = []
        for path in sorted(self.log_dir.glob("rank*.jsonl")):
            samples += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return samples

    def _results_file(self) -> Path | None:
        candidates = [p for p in self.results_dir.glob("*_results.json") if p.stat().st_mtime >= self.started]
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def finish(self) -> Path | None:
        """Close this rank's stream; on rank 0 write the merged summary. Returns the file written (none when
        the run was discarded, or recorded no sample and wrote no results). A failed write is a ``LedgerError``
        and leaves no summary file, not even a part of one."""
        self._close()
        if self.rank != 0 or not self.results_dir or self.discarded:
            return None
        samples = self._all_samples()
        results = self._results_file()
        if not samples and results is None:
            return None
        summary = {"settings": self.settings, "world_size": self.world_size, **summarize(samples)}
        retention = summary["achieved_retention"]
        # Printed, not logged: this runs at interpreter exit, when log sinks may already be closed.
        ratio = summary["llm_prefill_flops_ratio"]
        print(f"llava_redundancy tokens: {summary['visual_tokens_after']} of {summary['visual_tokens_before']} visual "
              f"tokens kept after the last cut (retention {'n/a' if retention is None else f'{retention:.4f}'}), "
              f"{summary['visual_tokens_layer_mean']:.1f} on average over decoder layers, LLM prefill FLOPs ratio "
              f"{'n/a' if ratio is None else f'{ratio:.4f}'}, floor hits {summary['floor_hits']}", file=sys.stderr)
        stem = results.name[: -len("_results.json")] if results else f"run-{self.launch}"
        summary["results_file"] = results.name if results else None
        out = self.results_dir / f"{stem}_tokens.json"
        try:
            write_atomically(out, json.dumps({**summary, "per_sample": samples}, indent=2))
        except OSError as err:
            raise LedgerError(f"could not write the token summary {out}: {err}; the run's results are incomplete "
                              f"without it (compare and sweep need it): free disk space (or make the folder "
                              "writable) and rerun") from err
        print(f"llava_redundancy token summary written to {out}", file=sys.stderr)
        return out

    def finish_at_exit(self) -> None:
        """``finish`` as an exit handler. Exit handlers cannot change the exit status by raising, so a summary
        that cannot be written prints its error and ends the process with status 1 (``os._exit`` after flushing
        stdio; the exit handlers registered before this one, lmms-eval's included, do not run)."""
        try:
            self.finish()
        except LedgerError as err:
            print(f"llava_redundancy: error: {err}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def results_dir_for(pretrained: str, output_dir: str | None = None) -> Path | None:
    """Where lmms-eval writes this model's results: ``<output_path>/<sanitized model name>``."""
    from lmms_eval.utils import sanitize_model_name

    base = output_dir or output_path_from_argv(sys.argv[1:])
    return Path(base) / sanitize_model_name(pretrained) if base else None
