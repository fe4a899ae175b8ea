"""`nnserve`: the SDK from a shell. Exit status 0 on success, 1 with the server's message on stderr on error."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from nnserve_client._client import Client
from nnserve_client._errors import NNServeError
from nnserve_client._types import ModelInfo


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with Client(base_url=args.url, api_key=args.api_key, timeout=args.timeout) as client:
            return args.run(client, args)
    except (NNServeError, OSError, ValueError) as exc:
        print(f"nnserve: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnserve", description="Query an nnserve server.")
    parser.add_argument("--url", help="server base URL (default: $NNSERVE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $NNSERVE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    health = commands.add_parser("health", help="is the server up and ready? (exit 1 if not ready)")
    health.set_defaults(run=_health)

    models = commands.add_parser("models", help="list served models, or show one")
    models.add_argument("name", nargs="?", help="show this model's full description as JSON")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=_models)

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("model", choices=["digits", "cifar"])
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true", help="print JSON (with the top-k classes)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per request")
    predict.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    predict.set_defaults(run=_predict)

    forecast = commands.add_parser("forecast", help="forecast the values after the end of a CSV column")
    forecast.add_argument("--csv", type=Path, required=True, metavar="FILE")
    forecast.add_argument("--column", required=True, metavar="COL")
    forecast.add_argument("--horizon", type=int, help="steps ahead (default: the model's horizon)")
    forecast.add_argument("--json", action="store_true", help="print JSON")
    forecast.set_defaults(run=_forecast)
    return parser


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health().status
    ready = client.ready()
    print(f"status: {status}\nready: {'yes' if ready else 'no'}")
    return 0 if ready else 1


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        print(client.model(args.name).model_dump_json(indent=2))
        return 0
    infos = client.models()
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in infos], indent=2))
    else:
        _table(["name", "version", "task", "backend", "device"], [_model_row(m) for m in infos])
    return 0


def _model_row(info: ModelInfo) -> list[str]:
    return [info.name, info.version, info.task, info.backend or "", info.device or ""]


def _predict(client: Client, args: argparse.Namespace) -> int:
    predictions = client.predict_many(
        args.model, args.files, batch_size=args.batch_size, concurrency=args.concurrency, top_k=args.top_k
    )
    if args.json:
        rows = [{"file": str(f), **p.model_dump(mode="json")} for f, p in zip(args.files, predictions, strict=True)]
        print(json.dumps(rows, indent=2))
    else:
        rows = [[str(f), p.label, f"{p.probability:.4f}"] for f, p in zip(args.files, predictions, strict=True)]
        _table(["file", "label", "probability"], rows)
    return 0


def _forecast(client: Client, args: argparse.Namespace) -> int:
    info = client.model("sequence")
    history = read_column(args.csv, args.column)
    if info.series:  # send what the model can use: its longest history
        history = history[-info.series["max_history"] :]
    result = client.forecast(history, horizon=args.horizon)
    if args.json:
        body = {"model": result.model, "version": result.version, "column": args.column, "history": len(history)}
        print(json.dumps({**body, "forecast": result.values}, indent=2))
    else:
        _table(["step", args.column], [[str(i), f"{v:.3f}"] for i, v in enumerate(result.values, start=1)])
    return 0


def read_column(path: Path, column: str) -> list[float]:
    """Every value of `column`, top to bottom, as floats."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(reader.fieldnames or [])}")
        values = []
        for line, row in enumerate(reader, start=2):
            try:
                values.append(float(row[column]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: {column} is not a number: {row[column]!r}") from None
    return values


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
