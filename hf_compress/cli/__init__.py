"""The `hf-compress` command (also `python -m hf_compress`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .. import __version__

DESCRIPTION = """\
Compress a Hugging Face model while it fine-tunes: distillation, pruning and quantisation-aware
training, described by one YAML recipe. `run` trains and writes the compressed model and a report
(report.json, report.md, report.png) comparing teacher and compressed model."""

EPILOG = """\
examples:
  hf-compress run configs/sst2_minilm.yaml data_dir=../shared/data
  hf-compress run configs/sst2_minilm.yaml training.max_steps=50 pruning.target_sparsity=0.8
  hf-compress run configs/sst2_minilm.yaml --dry-run          # check the recipe, print it resolved
  hf-compress report runs/sst2_minilm                          # re-render a finished run's report
  hf-compress export runs/sst2_minilm/model --onnx runs/sst2_minilm/onnx   # ONNX for ONNX Runtime
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no -m hf_compress run RECIPE.yaml   # 2 CPU processes

docs: docs/cli.md (recipe keys, model specs, data sources)"""

RUN_EPILOG = """\
overrides: dotted KEY=VALUE pairs; VALUE is read as YAML.
  training.max_steps=50          any TrainingArguments field under `training.`
  distillation.temperature=4     any DistillationConfig field under `distillation.`
  pruning.target_sparsity=0.9    any PruningConfig field (a new `pruning` section enables pruning)
  quantization.weight_bits=4     any QATConfig field
  student.layers=[0,3]           model.name=sentence-transformers/all-MiniLM-L6-v2   data.hub=glue/sst2
  data_dir=../shared/data        the folder holding the recipe's local data sets (data.local)
  output_dir=runs/try1           where checkpoints, the exported model and the report go
  pruning=null                   remove a section
Unknown keys are errors that name the nearest valid key."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-compress", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"hf-compress {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a compression recipe end to end",
        description="Build teacher and student from RECIPE, train with distillation / pruning / QAT as the recipe says, "
        "evaluate both, export the compressed model (<output_dir>/model) and write the report "
        "(<output_dir>/report.{json,md,png}).",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file (see configs/)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys, e.g. training.max_steps=50")
    run.add_argument("--dry-run", action="store_true", help="run every check that needs no training (recipe values, data files and labels, output folders, "
                     "models built on the meta device), print the recipe resolved, and stop")

    rep = sub.add_parser(
        "report", help="re-render the report of a finished run",
        description="Rewrite DIR/report.md and DIR/report.png from DIR/report.json and print the table.",
    )
    rep.add_argument("dir", metavar="DIR", help="the output folder of a finished `hf-compress run` (holds report.json)")
    rep.add_argument("--no-plot", action="store_true", help="do not write report.png")
    from .export import add_parser as add_export

    add_export(sub)
    from .analyze import add_parser as add_analyze

    add_analyze(sub)
    return p


def _run(args) -> int:
    import yaml

    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from accelerate import PartialState

        from .pipeline import prepare, training_args

        training_args(recipe)  # sets up the (distributed) state
        _, splits = prepare(recipe)  # data files, labels, models on the meta device: every check but training
        if PartialState().is_main_process:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            print(f"# recipe OK ({len(splits.train)} training / {len(splits.eval)} evaluation rows checked; models "
                  f"checked on the meta device): output in {recipe.out_dir}, model export in {recipe.export_dir}")
        return 0
    from .pipeline import run_recipe

    command = "hf-compress " + " ".join(shlex.quote(a) for a in ["run", args.recipe, *args.overrides])
    result = run_recipe(recipe, command=command)
    reload = result.get("export_reload")
    if reload is not None and not reload.get("ok"):
        why = reload.get("error") or f"its logits differ from the trained model's by {reload.get('max_abs_logit_diff'):.3g}"
        print(f"hf-compress: error: the export in {recipe.export_dir} did not reload as trained ({why}); "
              "see report.json (export_reload).", file=sys.stderr)
        return 1
    return 0


def _report(args) -> int:
    from .report import load_report, markdown_table, render_report

    paths = render_report(args.dir, plot=not args.no_plot)
    print(markdown_table(load_report(args.dir)["rows"]))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run RECIPE --dry-run KEY=VALUE`: overrides after an option are overrides too (argparse stops the
    # positional list at the first option)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    group_before = _process_group_initialized()
    try:
        if args.command == "export":
            from .export import run as _export

            return _export(args)
        if args.command == "analyze":
            from .analyze import run as _analyze

            return _analyze(args)
        return _run(args) if args.command == "run" else _report(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if os.environ.get("HF_COMPRESS_DEBUG"):
            raise
        print(f"hf-compress: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if not group_before:
            _end_process_group()


def _process_group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_process_group() -> None:
    """The command is the whole program, so a process group started while it ran (by the recipe's
    `training_args` on CPU, or by accelerate) ends with it. torch asks every program to destroy its group:
    at interpreter exit, gloo's worker threads can otherwise still hold work objects, and their teardown
    aborts the process (SIGABRT, "terminate called without an active exception") after a successful run.
    Destroying is local to this rank: no collective, so a rank that failed does not wait for the others."""
    if _process_group_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
