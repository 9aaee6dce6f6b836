"""The ``lmms-eval-redundancy`` command."""

from __future__ import annotations

import argparse
import sys

from lmms_eval_redundancy.core.errors import UserError

CODEBOOKS = "codebooks"  # where codebook builds and imports write unless told otherwise


def _at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give a whole number >= {minimum}")
        return value
    return whole_number


def _import_codebook(args) -> None:
    from pathlib import Path

    from lmms_eval_redundancy.codebook.store import (
        RELEASE_MODELS,
        import_release,
        load_codebook,
    )

    release = Path(args.release)
    if not release.is_file():
        raise UserError(f"release file {release} not found; give the paper's released .pt, e.g. "
                        ".../241228-162634-llava15/coco_train_500samples_numPrototypes-454.pt")
    if release.suffix == ".pt":  # what else it is, store.import_release says
        if args.model is None and not any(key in release.parent.name for key in RELEASE_MODELS):
            raise UserError(f"cannot tell which model {release} belongs to: its folder name {release.parent.name!r} holds "
                            f"none of {', '.join(RELEASE_MODELS)} (as the paper's release folders do); pass --model "
                            "CHECKPOINT, e.g. --model llava-hf/llava-1.5-7b-hf (and --threshold for its recommended threshold)")
        beside = {release.with_suffix(".json").name: release.with_suffix(".json").is_file(),
                  "config*.txt": any(release.parent.glob("config*.txt"))}
        missing = [name for name, found in beside.items() if not found]
        if missing:
            print(f"import-codebook: warning: no {' or '.join(missing)} beside {release}: the codebook will not record the "
                  "source image ids or build settings; put the release's files beside it to keep them", file=sys.stderr)
    try:
        out = import_release(release, args.out or Path(CODEBOOKS) / release.with_suffix(".safetensors").name,
                             model=args.model, threshold=args.threshold)
    except OSError as err:
        raise UserError(f"cannot write the codebook to {args.out} ({err}); give a writable path") from err
    codebook = load_codebook(out)
    print(f"wrote {out}: {codebook.prototypes.shape[0]} prototypes of size {codebook.hidden_size} "
          f"for {codebook.meta['model']}")


def _make_tiny(args) -> None:
    from lmms_eval_redundancy.core.files import output_folder
    from lmms_eval_redundancy.families import FAMILIES, build_tiny_model

    unknown = sorted(set(args.family or ()) - set(FAMILIES))
    if unknown:
        raise UserError(f"unknown family {', '.join(unknown)}; families: {', '.join(FAMILIES)}")
    output_folder(args.out)
    for family in args.family or FAMILIES:
        print(build_tiny_model(family, f"{args.out}/{family}", seed=args.seed))


def _make_local_data(args) -> None:
    import datasets

    from lmms_eval_redundancy.core.files import output_folder
    from lmms_eval_redundancy.embedded.shapes import patch_coverage
    from lmms_eval_redundancy.embedded.tasks import write_local_tasks

    folder = write_local_tasks(output_folder(args.out), shapes_docs=args.shapes_docs)
    images = datasets.load_dataset("parquet", data_files=str(folder / "data" / "shapes" / "shapes_image.parquet"))["train"]["image"]
    objects, clutter = patch_coverage(images)
    print(f"shapes_image: coloured objects touch {objects:.1%} of the 8-pixel patches, grey distractors {clutter:.1%}")
    print(f"local tasks and their data in {folder}; run them with --include_path {folder}")


def _tasks_path(args) -> None:
    from lmms_eval_redundancy.core.files import product_folder

    print(product_folder("tasks") / "paper")


def _train_shapes(args) -> None:
    from dataclasses import fields

    from lmms_eval_redundancy.embedded.training import TrainSettings, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name, None) is not None}
    if "task_weights" in overrides:
        overrides["task_weights"] = tuple(overrides["task_weights"])
    record = train(args.out, TrainSettings(**overrides))
    print(f"held-out answer accuracy {record['held_out_accuracy'][-1]['accuracy']} after {record['seconds']} s; "
          f"model in {args.out} (load it with pretrained={args.out})")


def _build_shapes_codebook(args) -> None:
    from lmms_eval_redundancy.embedded.shapes_codebook import build_shapes_codebook

    print(build_shapes_codebook(args.out, images=args.images, pretrained=args.pretrained))


def _methods(args) -> None:
    import typing

    from lmms_eval_redundancy.core.registry import (
        available_methods,
        method_class,
        param_fields,
    )

    for name in available_methods():
        cls = method_class(name)
        hints = typing.get_type_hints(cls.Params)
        params = ", ".join(f"{f.name}: {getattr(hints[f.name], '__name__', hints[f.name])} = {f.default!r}"
                           for f in param_fields(name)) or "-"
        budgets = ", ".join(f"{b}=" for b in cls.budgets) or "none"
        print(f"{name:12s} stage={cls.stage.value:11s} budgets: {budgets:30s} params: {params}")


def _demo(args) -> None:
    from lmms_eval_redundancy.embedded.demo import run

    run(args.out)


def _show_kept(args) -> None:
    from pathlib import Path

    from lmms_eval_redundancy.tools.show import (
        parse_spec,
        read_image,
        show_kept,
        task_image,
    )

    if bool(args.image) == bool(args.task):
        raise UserError("give either --image PATH or --task NAME (with --doc N), not both or neither")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"cannot write the PNG {out}: " + ("it is a folder" if out.is_dir() else f"no folder {out.parent}")
                        + "; give --out a file path in an existing folder")
    for spec in args.method:
        parse_spec(spec)
    image = read_image(args.image) if args.image else task_image(args.task, args.doc, args.include_path)
    print(show_kept(args.pretrained, image, args.method, args.out, args.scale))


def _bench_overhead(args) -> None:
    from lmms_eval_redundancy.tools.bench import overhead

    overhead(args.method, tokens=args.tokens, repeats=args.repeats, text_layers=args.text_layers,
             vision_layers=args.vision_layers)


def _bench_decode(args) -> None:
    from lmms_eval_redundancy.tools.bench_decode import decode_speed

    decode_speed(tuple(args.batch or (1, 8)), new_tokens=args.new_tokens, runs=args.runs, tokens=args.tokens,
                 compiled=args.compile, text_layers=args.text_layers, vision_layers=args.vision_layers)


def _build_codebook(args) -> None:
    import json
    from pathlib import Path

    from lmms_eval_redundancy.codebook.builder import build_codebook, load_settings
    from lmms_eval_redundancy.runtime.loading import process_layout

    args.out = args.out or str(Path(CODEBOOKS) / Path(args.pretrained.rstrip("/")).name)
    settings = load_settings(args.settings, batch_size=args.batch_size, skip_article=args.skip_article,
                             divergence=args.divergence)
    path = build_codebook(args.pretrained, args.images, args.out, settings, limit=args.limit, device=args.device)
    rank = process_layout().rank
    stats = json.loads((Path(args.out) / f"probe_stats_rank{rank}.json").read_text())
    if stats["probed"]:
        print(f"probe stage (rank {rank}): {stats['probed']} images in {stats['seconds']:.1f} s = "
              f"{stats['probed'] / stats['seconds']:.2f} images/s, {stats['forward_passes'] / stats['probed']:.1f} "
              f"batched forward passes per image (batch_size {settings.batch_size})")
    if path:
        report = json.loads((Path(args.out) / "report.json").read_text())
        print(f"wrote {path}: {report['prototypes']} prototypes from {report['images'] - report['unreadable']} of "
              f"{report['images']} images; report in {Path(args.out) / 'report.json'}")
        if report["unreadable"]:
            print(f"{report['unreadable']} unreadable image(s) left out:\n  "
                  + "\n  ".join(f"{u['where']}: {u['error']}" for u in report["unreadable_images"])
                  + "\nremove or replace them; a rerun into the same folder probes replaced images again", file=sys.stderr)


def _sweep(args) -> None:
    from lmms_eval_redundancy.core.files import write_atomically
    from lmms_eval_redundancy.tools.sweep import (
        SweepError,
        check_with_lmms_eval,
        dry_run,
        failure_report,
        load_sweep,
        run_sweep,
        slurm_script,
    )

    sweep = load_sweep(args.spec)
    if args.dry_run or args.slurm:
        check_with_lmms_eval(sweep)
    if args.dry_run:
        print(dry_run(sweep))
        return
    if args.slurm:
        try:
            write_atomically(args.slurm, slurm_script(sweep))
        except OSError as err:
            raise SweepError(f"cannot write the Slurm script {args.slurm}: {err.strerror}; give a writable path") from None
        print(f"wrote {args.slurm}: a job array of {len(sweep.cells)} cells; submit it with sbatch")
        return
    counts = run_sweep(sweep, only=args.cell)
    print(f"sweep: ran {counts['ran']} cells, {counts['already_done']} were already done")
    if counts["failed"]:
        raise SystemExit(failure_report(counts["failed"]))


def _compare(args) -> None:
    from pathlib import Path

    from lmms_eval_redundancy.tools.compare import collect, compare, markdown

    published = None
    if args.published:  # read first: a bad file stops the command before anything is written
        from lmms_eval_redundancy.tools.published import PUBLISHED, load_published

        published = load_published(PUBLISHED if args.published == "shipped" else args.published)
    out = Path(args.out or Path(args.results) / "compare")
    tables, duplicates = compare(args.results, out, args.match)
    for model, table in tables.items():
        print(f"## {model}\n")
        print(markdown(table, notes=True) + "\n")
    for duplicate in duplicates:
        print(f"duplicate run left out: {duplicate['run']} repeats {', '.join(duplicate['tasks'])} with the same settings "
              f"as {', '.join(duplicate['kept'])}", file=sys.stderr)
    if published is not None:
        from lmms_eval_redundancy.tools.published import (
            side_by_side,
            task_map,
            write_published,
        )

        beside = side_by_side(collect(args.results).frame, published, task_map())
        for model, (table, notes) in beside.items():
            print(f"## {model}: our runs and published numbers\n")
            print(markdown(table))
            print("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        write_published(beside, out)
        if not beside:
            print("no run of a checkpoint with published numbers (LLaVA-1.5-7B, LLaVA-NeXT-7B) on a mapped benchmark")
    print(f"tables (.md, .csv, .tex) and plots in {out}")


def _bench(args) -> None:
    from lmms_eval_redundancy.tools.bench import speed

    speed(args.method, tokens=args.tokens, samples=args.samples, batch_sizes=args.batch_sizes, text_layers=args.text_layers,
          vision_layers=args.vision_layers, new_tokens=args.new_tokens, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-eval-redundancy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-codebook", help="convert a paper release .pt into the project's codebook format")
    p.add_argument("release", help="the released .pt tensor (its .json and config*.txt are read from beside it)")
    p.add_argument("out", nargs="?", help=f"output .safetensors file or folder (default: {CODEBOOKS}/<release name>.safetensors)")
    p.add_argument("--model", help="checkpoint the codebook belongs to (default: recognised from the folder name)")
    p.add_argument("--threshold", type=float, help="recommended threshold= budget (default: the released one)")
    p.set_defaults(func=_import_codebook)

    p = sub.add_parser("build-codebook", help="build a redundancy codebook for a checkpoint from training images")
    p.add_argument("pretrained", help="checkpoint folder or hub id")
    p.add_argument("images", help="a folder of images, or a dataset saved with datasets' save_to_disk (column 'image')")
    p.add_argument("out", nargs="?", help="output folder: codebook.safetensors, report.json, plots, probes/ (the resumable "
                   f"cache; default: {CODEBOOKS}/<checkpoint name>)")
    p.add_argument("--settings", default="llava15", help="a YAML of build settings (may name a 'preset:') or a preset: "
                   "llava15, llavanext, llavaov")
    p.add_argument("--limit", type=_at_least(1), help="use only the first N images")
    p.add_argument("--batch-size", type=_at_least(1), help="probes per forward pass")
    p.add_argument("--divergence", choices=["jsd_topk", "jsd"], help="default: the settings' (jsd_topk, as officially)")
    p.add_argument("--skip-article", action=argparse.BooleanOptionalAction,
                   help="read the token after a leading article (default: the settings'; the released presets skip it)")
    p.add_argument("--device")
    p.set_defaults(func=_build_codebook)

    p = sub.add_parser("sweep", help="run methods x budgets x tasks (plus the unpruned reference), resumable")
    p.add_argument("spec", help="the sweep YAML")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their status and commands; run nothing")
    p.add_argument("--slurm", metavar="FILE", help="write a Slurm job-array script (one cell per task) instead of running")
    p.add_argument("--cell", type=int, help="run only cell number N (what each Slurm array task does)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("compare", help="tables (markdown, CSV, LaTeX) and plots of llava_redundancy runs against unpruned")
    p.add_argument("results", help="a sweep output folder or any folder holding llava_redundancy lmms-eval outputs")
    p.add_argument("--out", help="where to write (default: RESULTS/compare)")
    p.add_argument("--match", choices=("tokens", "layer_mean", "flops"), default="tokens",
                   help="the plot's x-axis: visual tokens after the last cut (default), their mean over decoder layers, or "
                        "the FLOPs ratio; layer_mean and flops also tabulate every method at equal values of it")
    p.add_argument("--published", nargs="?", const="shipped", metavar="FILE",
                   help="also place the runs beside published numbers (default file: the project's own, "
                        "lmms_eval_redundancy/published/llava_published.csv)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("make-tiny", help="build tiny random LLaVA-family checkpoints (offline, for tests and demos)")
    p.add_argument("out", help="folder; one sub-folder per family")
    p.add_argument("--family", action="append", help="a LLaVA family (default: every one); repeat")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("make-local-data", help="write the local tasks (tiny_*, shapes_*) and generate their data")
    p.add_argument("--out", default="local_tasks", help="folder for the task files and data (the --include_path)")
    p.add_argument("--shapes-docs", type=_at_least(2), default=96, help="documents per shapes task, at least 2 (videos: half as many)")
    p.set_defaults(func=_make_local_data)

    p = sub.add_parser("tasks-path", help="print the folder of the paper's task groups (for --include_path)")
    p.set_defaults(func=_tasks_path)

    p = sub.add_parser("demo", help="the main job: every method at several budgets on the built-in shapes model and benchmark, compared (CPU, offline)")
    p.add_argument("--out", default="results", help="folder for the sweep (runs/) and the comparison (compare/)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("show-kept", help="draw the tokens each method keeps over an image, side by side, into a PNG")
    p.add_argument("pretrained", help="checkpoint folder or hub id")
    p.add_argument("--image", help="an image file")
    p.add_argument("--task", help="an lmms-eval task; its document --doc gives the image")
    p.add_argument("--doc", type=_at_least(0), default=0)
    p.add_argument("--include_path", help="folder of extra task YAMLs (e.g. tasks/local)")
    p.add_argument("--method", action="append", required=True,
                   help='method and its model_args, e.g. "none" or "codebook,codebook=cb.safetensors,threshold=0.45"; repeat')
    p.add_argument("--scale", type=_at_least(1), default=4, help="enlarge the tiles by this factor")
    p.add_argument("--out", default="kept.png")
    p.set_defaults(func=_show_kept)

    p = sub.add_parser("bench", help="device prefill speed-up per method vs unpruned (measured, FLOPs- and roofline-predicted) "
                                     "and samples/s, on LLaVA-1.5-7B widths")
    p.add_argument("--method", action="append", help="methods to time (default: every registered one); the unpruned reference always runs")
    p.add_argument("--tokens", type=int, default=64, help="visual tokens kept of 576")
    p.add_argument("--samples", type=_at_least(1), default=5, help="timed batches per method and batch size, after a warm-up batch")
    p.add_argument("--batch-sizes", type=_at_least(1), nargs="+", help="batch sizes to time (default: 1 8 on GPU, 1 on CPU)")
    p.add_argument("--new-tokens", type=_at_least(1), help="tokens generated per request (default: 16 on GPU, 4 on CPU)")
    p.add_argument("--threads", type=_at_least(1), help="torch CPU threads (default on CPU: 1, stable on a shared machine)")
    p.add_argument("--text-layers", type=int, help="LLM layers (default: 32 on GPU, 4 on CPU)")
    p.add_argument("--vision-layers", type=int, help="vision layers (default: 24 on GPU, 3 on CPU)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("bench-overhead", help="each method's selection time against unpruned prefill (LLaVA-1.5 widths)")
    p.add_argument("--method", action="append", help="methods to time (default: every registered one)")
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64, help="visual tokens kept of 576")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=_bench_overhead)

    p = sub.add_parser("bench-decode", help="decode time per token: dynamic vs static KV cache (and compiled), LLaVA-1.5-7B widths")
    p.add_argument("--batch", type=_at_least(1), action="append", help="batch size; repeat (default: 1 and 8)")
    p.add_argument("--new-tokens", type=_at_least(2), default=16, help="tokens generated per run")
    p.add_argument("--runs", type=_at_least(1), default=3, help="timed runs per variant, after a warm-up run")
    p.add_argument("--tokens", type=_at_least(1), default=64, help="visual tokens kept of 576 (the prompt's length)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decoding step (compiles on a CPU too; slow)")
    p.add_argument("--text-layers", type=_at_least(1), help="LLM layers (default: 32 on GPU, 4 on CPU)")
    p.add_argument("--vision-layers", type=_at_least(1), help="vision layers (default: 24 on GPU, 3 on CPU)")
    p.set_defaults(func=_bench_decode)

    p = sub.add_parser("train-shapes", help="train the built-in shapes model (builtin:shapes) from scratch, seeded")
    p.add_argument("--out", default="shapes-model", help="output folder (default: ./shapes-model; the shipped builtin:shapes "
                   "changes only if you name its folder here)")
    for name in ("seed", "data_seed", "docs", "steps", "batch_size", "eval_every", "warmup", "canvas"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in ("lr", "dropout_steps", "max_dropout"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float)
    p.add_argument("--task-weights", type=int, nargs=3, help="steps per cycle for shapes_image, shapes_multi_image, shapes_video")
    p.add_argument("--init-from", help="continue training a saved shapes model, e.g. builtin:shapes (its record is kept)")
    p.set_defaults(func=_train_shapes)

    p = sub.add_parser("build-shapes-codebook", help="build the codebook of builtin:shapes from generated training scenes")
    p.add_argument("--out", default="shapes-codebook", help="output folder (default: ./shapes-codebook)")
    p.add_argument("--pretrained", default="builtin:shapes", help="the shapes model to build it for")
    p.add_argument("--images", type=int, default=256, help="training scenes to build from")
    p.set_defaults(func=_build_shapes_codebook)

    p = sub.add_parser("methods", help="list the pruning methods with their stage, budgets and parameters")
    p.set_defaults(func=_methods)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a command; a ``UserError`` (bad input or environment) is printed without a traceback, exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        parser.exit(2, f"lmms-eval-redundancy {args.command}: error: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
