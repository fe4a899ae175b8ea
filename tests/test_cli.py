"""The `nnserve` command line, run as a separate process against a real server."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data import cifar_test_pngs, data_dir, mnist_test_pngs

WEATHER = data_dir() / "timeseries" / "seattle-weather-daily.csv"


def nnserve(*args: str | Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--url", url] if url else []
    command = [sys.executable, "-m", "nnserve_client.cli", *prefix, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, int]]:
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for i, (png, label) in enumerate(mnist_test_pngs(6)):
        path = folder / f"digit-{i}.png"
        path.write_bytes(png)
        files.append((path, label))
    return files


def test_health(server) -> None:
    result = nnserve("health", url=server.url)
    assert result.returncode == 0, result.stderr
    assert "status: ok" in result.stdout and "ready: yes" in result.stdout


def test_models_table_and_one_model(server) -> None:
    table = nnserve("models", url=server.url)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["name", "version", "task", "backend", "device"]
    assert {row.split()[0] for row in rows} >= {"digits", "cifar", "sequence"}
    listed = json.loads(nnserve("models", "--json", url=server.url).stdout)
    assert {m["name"] for m in listed} == {row.split()[0] for row in rows}
    one = json.loads(nnserve("models", "sequence", url=server.url).stdout)
    assert one["name"] == "sequence" and one["task"] == "forecast" and one["manifest"]["series"]["horizon"] >= 1


def test_predict_digits_json(server, digit_files: list[tuple[Path, int]]) -> None:
    paths = [path for path, _ in digit_files]
    result = nnserve("predict", "digits", *paths, "--json", "--top-k", "2", "--batch-size", "2", url=server.url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["file"] for row in rows] == [str(p) for p in paths]
    assert all(len(row["top_k"]) == 2 and 0 < row["probability"] <= 1 for row in rows)
    correct = sum(int(row["label"]) == label for row, (_, label) in zip(rows, digit_files, strict=True))
    assert correct >= len(digit_files) - 1


def test_predict_table(server, tmp_path: Path) -> None:
    samples = cifar_test_pngs()[:4]
    paths = []
    for i, (png, _) in enumerate(samples):
        paths.append(tmp_path / f"image-{i}.png")
        paths[-1].write_bytes(png)
    result = nnserve("predict", "cifar", *paths, url=server.url)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["file", "label", "probability"]
    assert [row.split()[0] for row in rows] == [str(p) for p in paths]
    assert all(0 < float(row.split()[2]) <= 1 for row in rows)


def test_forecast_json(server) -> None:
    horizon = json.loads(nnserve("models", "sequence", url=server.url).stdout)["manifest"]["series"]["horizon"]
    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_max", "--json", url=server.url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"] == "sequence" and body["column"] == "temp_max"
    assert len(body["forecast"]) == horizon and all(math.isfinite(v) for v in body["forecast"])
    with open(WEATHER, newline="") as f:
        recent = [float(row["temp_max"]) for row in csv.DictReader(f)][-body["history"] :]
    assert min(recent) - 10 <= sum(body["forecast"]) / horizon <= max(recent) + 10  # plausible temperatures


def test_forecast_table_with_horizon(server) -> None:
    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_max", "--horizon", "2", url=server.url)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["step", "temp_max"] and [row.split()[0] for row in rows] == ["1", "2"]


def test_errors_exit_non_zero_with_the_servers_message(server, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    result = nnserve("predict", "digits", garbage, url=server.url)
    assert result.returncode == 1 and "invalid_image" in result.stderr and result.stdout == ""

    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_max", "--horizon", "999", url=server.url)
    assert result.returncode == 1 and "invalid_horizon" in result.stderr and "horizon" in result.stderr

    result = nnserve("models", "no-such-model", url=server.url)
    assert result.returncode == 1 and "404" in result.stderr


def test_local_errors_exit_non_zero(server, tmp_path: Path) -> None:
    result = nnserve("forecast", "--csv", WEATHER, "--column", "humidity", url=server.url)
    assert result.returncode == 1 and "temp_max" in result.stderr  # lists the columns there are
    result = nnserve("predict", "digits", tmp_path / "missing.png", url=server.url)
    assert result.returncode == 1 and "missing.png" in result.stderr
    result = nnserve("health", url="http://127.0.0.1:9")
    assert result.returncode == 1 and "error" in result.stderr
    assert nnserve("predict", "nosuchmodel", "x.png").returncode == 2  # argparse usage error
