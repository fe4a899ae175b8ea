"""`python -m training digits|cifar|sequence [options]`, and `python -m training export VERSION_DIR`.

Examples:
    python -m training digits                      # the strong CNN, plus the seed MLP as baseline
    python -m training cifar --arch cnn --epochs 3
    python -m training sequence --cell gru
    python -m training cifar --device cuda --no-export && python -m training export models/cifar/2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from training.config import DEFAULT_DATA_DIR, DEFAULT_OUT, CifarConfig, DigitsConfig, RunConfig, SequenceConfig

ARCHS = {"digits": ("cnn", "mlp"), "cifar": ("resnet", "cnn")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    for task in ("digits", "cifar", "sequence"):
        p = tasks.add_parser(task, help=f"train and export the {task} model")
        if task == "sequence":
            p.add_argument(
                "--cell",
                choices=("rnn", "lstm", "gru", "all"),
                default="all",
                help="recurrent cell; all trains each and keeps the best on validation (default)",
            )
        else:
            p.add_argument(
                "--arch",
                choices=ARCHS[task],
                default=ARCHS[task][0],
                help=f"network (default {ARCHS[task][0]}; {ARCHS[task][1]} is the seed network and recipe)",
            )
            p.add_argument(
                "--baseline",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="also train the seed network and record its test accuracy as the baseline",
            )
            p.add_argument("--max-train-items", type=int, help="train on the first N images only")
        p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data sets (default: %(default)s)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model repository (default: %(default)s)")
        p.add_argument("--version", help="version folder to write (default: the next free number)")
        p.add_argument(
            "--no-export",
            dest="export",
            action="store_false",
            help="stop after checkpoint.pt and curves.png; `python -m training export` finishes later",
        )
    p = tasks.add_parser("export", help="export a trained version folder (one holding checkpoint.pt)")
    p.add_argument("version_dir", type=Path)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="test data (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    common = dict(
        data_dir=args.data_dir,
        out=args.out,
        version=args.version,
        device=args.device,
        seed=args.seed,
    )
    if args.epochs is not None:
        common["epochs"] = args.epochs
    if args.task == "sequence":
        return replace(SequenceConfig(cell=args.cell), **common)
    cls = DigitsConfig if args.task == "digits" else CifarConfig
    return cls.recipe(args.arch, baseline=args.baseline, max_train_items=args.max_train_items, **common)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Imported here: `--help` and argument errors answer without loading torch (about 2 s).
    from training.export import export_version

    if args.task == "export":
        export_version(args.version_dir, args.data_dir)
        return
    from training.train import run

    cfg = config_from_args(args)
    path = run(cfg, command=shlex.join(["python", "-m", "training", *argv]))
    if args.export:
        export_version(path, cfg.data_dir)


if __name__ == "__main__":
    main()
