"""`nnserve`: the SDK from a shell.

Exit status 0 on success; 1 on an error (the server's message on stderr) or when any input of `predict` failed;
2 on a usage error.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from nnserve_client._client import Client
from nnserve_client._errors import NNServeError, NotFoundError
from nnserve_client._types import ItemError, ModelInfo, Prediction
from nnserve_client._version import __version__

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
DATE_COLUMNS = ("date", "day", "datetime", "timestamp", "time", "ds")
OUTPUTS = ("table", "json", "csv")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            with Client(base_url=args.url, api_key=args.api_key, timeout=args.timeout) as client:
                return args.run(client, args)
        except (NNServeError, OSError, ValueError) as exc:
            notes = getattr(exc, "__notes__", [])
            print(f"nnserve: error: {exc}" + (f" ({'; '.join(notes)})" if notes else ""), file=sys.stderr)
            return 1


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"nnserve: warning: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"nnserve: warning: {message}", file=sys.stderr)


# Arguments -----------------------------------------------------------------------------------------------


def _global_options(in_command: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name.

    A command's copy has no defaults (SUPPRESS), so it sets only what is written after the command name and
    never overwrites what was written before it.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_command else value

    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--url", default=default(None), help="server base URL (default: $NNSERVE_URL or http://127.0.0.1:8000)"
    )
    group.add_argument("--api-key", default=default(None), help="API key (default: $NNSERVE_API_KEY)")
    group.add_argument(
        "--timeout", type=float, default=default(30.0), metavar="S", help="seconds per request (default: 30)"
    )
    group.add_argument(
        "--output", "-o", choices=OUTPUTS, default=default("table"), help="output format (default: table)"
    )
    group.add_argument(
        "--json", dest="output", action="store_const", const="json", default=default("table"), help="--output json"
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnserve", description="Query an nnserve server.", parents=[_global_options(in_command=False)]
    )
    parser.add_argument("--version", action="version", version=f"nnserve-client {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    common = [_global_options(in_command=True)]

    health = commands.add_parser("health", parents=common, help="is the server up and ready? (exit 1 if not ready)")
    health.set_defaults(run=_health)

    models = commands.add_parser("models", parents=common, help="list served models, or show one")
    models.add_argument("name", nargs="?", help="show this model's whole description (always JSON)")
    models.set_defaults(run=_models)

    predict = commands.add_parser(
        "predict",
        parents=common,
        help="classify image files with any classification model the server lists",
        description="Classify image files. Each file gets its own result or error; the exit status is 1 if any failed.",
    )
    predict.add_argument("model", metavar="MODEL", help="a classification model the server lists (nnserve models)")
    predict.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE",
        help="image files, folders (the images directly in them) or quoted glob patterns ('photos/**/*.png')",
    )
    predict.add_argument("--top-k", type=int, default=3, metavar="K", help="classes per image in JSON (default: 3)")
    predict.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per request (default: 64)")
    predict.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    predict.add_argument("--fail-fast", action="store_true", help="stop at the first file that fails")
    predict.add_argument("--progress", action="store_true", help="show a count of images done on stderr")
    predict.set_defaults(run=_predict)

    forecast = commands.add_parser(
        "forecast",
        parents=common,
        help="forecast the values after the end of a CSV column",
        description="Forecast the values that follow a CSV column, dated when the CSV has a date column.",
    )
    forecast.add_argument("--csv", type=Path, required=True, metavar="FILE", help="CSV file with a header row")
    forecast.add_argument(
        "--column", metavar="COL", help="the column to forecast (default: the one the model was trained on)"
    )
    forecast.add_argument(
        "--date-column",
        metavar="COL",
        help=f"dates of the rows, to date the forecast (default: the first of {', '.join(DATE_COLUMNS)} found)",
    )
    forecast.add_argument("--horizon", type=int, metavar="N", help="steps ahead (default: the model's horizon)")
    forecast.set_defaults(run=_forecast)
    return parser


# Commands ------------------------------------------------------------------------------------------------


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health().status
    ready = client.ready()
    if args.output == "json":
        print(json.dumps({"status": status, "ready": ready}))
    elif args.output == "csv":
        _csv(["status", "ready"], [[status, str(ready).lower()]])
    else:
        print(f"status: {status}\nready: {'yes' if ready else 'no'}")
    return 0 if ready else 1


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        print(client.model(args.name).model_dump_json(indent=2))
        return 0
    infos = client.models()
    header = ["name", "version", "task", "backend", "device"]
    rows = [[m.name, m.version, m.task, m.backend or "", m.device or ""] for m in infos]
    _emit(args.output, header, rows, lambda: [m.model_dump(mode="json") for m in infos])
    return 0


def _predict(client: Client, args: argparse.Namespace) -> int:
    _check_classifier(client, args.model)
    files = expand_inputs(args.inputs)
    results = client.predict_many(
        args.model,
        files,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        top_k=args.top_k,
        fail_fast=args.fail_fast,
        progress=args.progress,
    )
    failed = [r for r in results if isinstance(r, ItemError)]
    header = ["file", "label", "probability"] + (["error"] if failed else [])
    if args.output == "csv":
        header = ["file", "index", "label", "probability", "error"]
    rows = [_prediction_row(str(f), r, args.output) for f, r in zip(files, results, strict=True)]
    _emit(args.output, header, rows, lambda: [_prediction_json(str(f), r) for f, r in zip(files, results, strict=True)])
    if failed:
        names = ", ".join(r.source or str(r.index) for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
        print(f"nnserve: {len(failed)} of {len(results)} files failed: {names}", file=sys.stderr)
        return 1
    return 0


def _check_classifier(client: Client, model: str) -> None:
    """Refuse, naming the models that would do, unless `model` is a classifier the server serves."""
    try:
        info = client.model(model)
    except NotFoundError:
        info = None
    if info is None or info.task != "classification":
        usable = ", ".join(m.name for m in client.models() if m.task == "classification")
        what = "is not served" if info is None else f"is a {info.task} model"
        raise ValueError(f"{model!r} {what}; classification models: {usable or 'none'}")


def _prediction_row(file: str, result: Prediction | ItemError, output: str) -> list[str]:
    if output == "csv":
        if isinstance(result, ItemError):
            return [file, "", "", "", str(result.error)]
        return [file, str(result.index), result.label, f"{result.probability:.6f}", ""]
    if isinstance(result, ItemError):
        return [file, "-", "-", f"{result.code}: {result.message}"]
    return [file, result.label, f"{result.probability:.4f}"]


def _prediction_json(file: str, result: Prediction | ItemError) -> dict[str, Any]:
    if isinstance(result, ItemError):
        status = getattr(result.error, "status_code", None)
        return {"file": file, "error": {"status": status, "code": result.code, "message": result.message}}
    return {"file": file, **result.model_dump(mode="json")}


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files from the command line: a folder gives the images directly in it, a pattern the files it matches.

    Shells expand unquoted patterns themselves; this covers quoted ones (and `**`, which sh does not know).
    A path that does not exist and is no pattern stays, to fail as that file's own result.
    """
    files: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{text}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            files += found
        elif not path.exists() and glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"{text}: no file matches this pattern")
            files += found
        else:
            files.append(path)
    return files


def _forecast(client: Client, args: argparse.Namespace) -> int:
    info = client.model("sequence")
    trained = trained_column(info)
    column = args.column or trained
    if column is None:
        raise ValueError("the model does not say which column it was trained on: give --column")
    if trained and column != trained:
        _warn(f"the model was trained on {trained!r}, not {column!r}: its forecast assumes the two behave alike")
    table = read_csv(args.csv)
    history = numbers(table, column, args.csv)
    result = client.forecast(history, horizon=args.horizon)
    dates = future_dates(table, args.date_column, len(result.values), args.csv)
    steps = dates or [str(i) for i in range(1, len(result.values) + 1)]
    rows = [[step, f"{value:.3f}"] for step, value in zip(steps, result.values, strict=True)]
    body = {
        "model": result.model,
        "version": result.version,
        "column": column,
        "history_used": result.history_used,
        "forecast": result.values,
        **({"dates": dates} if dates else {}),
    }
    _emit(args.output, ["date" if dates else "step", column], rows, lambda: body)
    return 0


def trained_column(info: ModelInfo) -> str | None:
    """The CSV column the forecaster was trained on, as its manifest records it."""
    config = (info.manifest.get("training") or {}).get("config") or {}
    if isinstance(config.get("column"), str):
        return config["column"]
    target = (info.series or {}).get("target")  # "temp_max (degrees C)": the name, then its unit
    return target.split()[0] if isinstance(target, str) and target.strip() else None


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def numbers(table: list[dict[str, str]], column: str, path: Path) -> list[float]:
    """Every value of `column`, top to bottom, as floats."""
    if not table or column not in table[0]:
        columns = ", ".join(table[0]) if table else "none (the file is empty)"
        raise ValueError(f"{path} has no column {column!r}; columns: {columns}")
    values = []
    for line, row in enumerate(table, start=2):
        try:
            values.append(float(row[column]))
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line}: {column} is not a number: {row[column]!r}") from None
    return values


def future_dates(table: list[dict[str, str]], column: str | None, steps: int, path: Path) -> list[str] | None:
    """The dates of the `steps` rows after the last, spaced like the last two rows; None without a date column."""
    if column is None:
        column = next((c for c in table[0] if c.strip().lower() in DATE_COLUMNS), None) if table else None
        if column is None:
            return None
    elif not table or column not in table[0]:
        raise ValueError(f"{path} has no column {column!r}")
    if len(table) < 2:
        return None  # one row gives no spacing to go by
    try:
        previous, last = (_parse_date(row[column]) for row in table[-2:])
    except ValueError as exc:
        _warn(f"{path}: column {column!r} holds no dates I can read ({exc}); numbering the steps instead")
        return None
    step = last - previous
    if step <= timedelta(0):
        _warn(f"{path}: the last two dates in {column!r} do not increase; numbering the steps instead")
        return None
    daily = step % timedelta(days=1) == timedelta(0) and last.time() == datetime.min.time()
    return [
        (last + step * k).date().isoformat() if daily else (last + step * k).isoformat() for k in range(1, steps + 1)
    ]


def _parse_date(text: str) -> datetime:
    """ISO dates and times, also with slashes (2015/12/31, as NOAA's daily files write them)."""
    return datetime.fromisoformat(text.strip().replace("/", "-"))


# Output --------------------------------------------------------------------------------------------------


def _emit(output: str, header: list[str], rows: list[list[str]], as_json: Callable[[], object]) -> None:
    if output == "json":
        print(json.dumps(as_json(), indent=2))
    elif output == "csv":
        _csv(header, rows)
    else:
        _table(header, rows)


def _csv(header: list[str], rows: list[list[str]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerows([header, *rows])


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; rows may be shorter than the header (no error for most files)."""
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
