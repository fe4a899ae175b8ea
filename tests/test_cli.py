"""The `nnserve` command line, run as a separate process against a real server."""

from __future__ import annotations

import argparse
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
    series = json.loads(nnserve("models", "sequence", url=server.url).stdout)["manifest"]["series"]
    horizon = series["horizon"]
    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_max", "--json", url=server.url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"] == "sequence" and body["column"] == "temp_max"
    assert len(body["forecast"]) == horizon and all(math.isfinite(v) for v in body["forecast"])
    with open(WEATHER, newline="") as f:
        rows = list(csv.DictReader(f))
    # The file holds 4 years; the model reads at most max_history days: the most recent ones, said once.
    assert len(rows) > series["max_history"] == body["history_used"]
    assert result.stderr.count("warning") == 1 and f"most recent {series['max_history']}" in result.stderr
    recent = [float(row["temp_max"]) for row in rows][-body["history_used"] :]
    assert min(recent) - 10 <= sum(body["forecast"]) / horizon <= max(recent) + 10  # plausible temperatures
    assert rows[-1]["date"] == "2015/12/31"  # the days that follow, as ISO dates
    assert body["dates"] == [f"2016-01-{day:02d}" for day in range(1, horizon + 1)]


def test_forecast_table_with_horizon_and_the_trained_column_by_default(server) -> None:
    result = nnserve("forecast", "--csv", WEATHER, "--horizon", "2", url=server.url)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["date", "temp_max"] and [row.split()[0] for row in rows] == ["2016-01-01", "2016-01-02"]


def test_forecast_warns_about_a_column_the_model_was_not_trained_on(server) -> None:
    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_min", "--output", "csv", url=server.url)
    assert result.returncode == 0, result.stderr
    assert "trained on 'temp_max', not 'temp_min'" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "date,temp_min" and len(lines) == 8 and lines[1].startswith("2016-01-01,")


def test_forecast_without_dates_numbers_the_steps(server, tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    with open(WEATHER, newline="") as f:
        values = [row["temp_max"] for row in csv.DictReader(f)][-30:]
    plain.write_text("temp_max\n" + "\n".join(values) + "\n")
    result = nnserve("forecast", "--csv", plain, "--horizon", "3", "--json", url=server.url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert "dates" not in body and body["history_used"] == 30 and len(body["forecast"]) == 3 and result.stderr == ""
    table = nnserve("forecast", "--csv", plain, "--horizon", "3", url=server.url)
    assert [line.split()[0] for line in table.stdout.splitlines()] == ["step", "1", "2", "3"]


def test_a_bad_file_gets_its_error_and_the_rest_their_results(
    server, digit_files: list[tuple[Path, int]], tmp_path: Path
) -> None:
    garbage, missing = tmp_path / "garbage.png", tmp_path / "missing.png"
    garbage.write_bytes(b"not an image at all")
    good = [path for path, _ in digit_files]
    files = [good[0], garbage, *good[1:], missing]
    result = nnserve("predict", "digits", *files, "--batch-size", "3", "--json", url=server.url)
    assert result.returncode == 1  # something failed, after everything else was classified
    rows = json.loads(result.stdout)
    assert [row["file"] for row in rows] == [str(f) for f in files]
    assert rows[1]["error"]["code"] == "invalid_image" and rows[1]["error"]["status"] == 400
    assert rows[-1]["error"]["code"] == "FileNotFoundError" and rows[-1]["error"]["status"] is None
    labels = [int(row["label"]) for row in rows if "error" not in row]
    assert sum(got == want for got, want in zip(labels, [label for _, label in digit_files], strict=True)) >= 5
    assert f"2 of {len(files)} files failed: {garbage}, {missing}" in result.stderr

    table = nnserve("predict", "digits", good[0], garbage, url=server.url)
    header, first, second = table.stdout.splitlines()
    assert table.returncode == 1 and header.split() == ["file", "label", "probability", "error"]
    assert first.split()[0] == str(good[0]) and second.split()[:3] == [str(garbage), "-", "-"]
    assert "invalid_image" in second

    fast = nnserve("predict", "digits", good[0], garbage, good[1], "--fail-fast", url=server.url)
    assert fast.returncode == 1 and fast.stdout == ""
    assert "invalid_image" in fast.stderr and f"item 1: {garbage}" in fast.stderr


def test_errors_exit_non_zero_with_the_servers_message(server) -> None:

    result = nnserve("forecast", "--csv", WEATHER, "--column", "temp_max", "--horizon", "999", url=server.url)
    assert result.returncode == 1 and "invalid_horizon" in result.stderr and "horizon" in result.stderr

    result = nnserve("models", "no-such-model", url=server.url)
    assert result.returncode == 1 and "404" in result.stderr


def test_local_errors_exit_non_zero(server, tmp_path: Path) -> None:
    result = nnserve("forecast", "--csv", WEATHER, "--column", "humidity", url=server.url)
    assert result.returncode == 1 and "temp_max" in result.stderr  # lists the columns there are
    result = nnserve("predict", "digits", tmp_path / "missing.png", url=server.url)
    assert result.returncode == 1 and "missing.png" in result.stderr
    result = nnserve("predict", "digits", f"{tmp_path}/*.png", url=server.url)
    assert result.returncode == 1 and "no file matches" in result.stderr
    result = nnserve("health", url="http://127.0.0.1:9")
    assert result.returncode == 1 and "error" in result.stderr
    assert nnserve("predict", "digits").returncode == 2  # argparse usage error: no files


def test_predict_takes_any_classification_model_the_server_lists(server, digit_files) -> None:
    path = digit_files[0][0]
    for model in ("nosuchmodel", "sequence"):
        result = nnserve("predict", model, path, url=server.url)
        assert result.returncode == 1 and result.stdout == ""
        assert model in result.stderr and "classification models: cifar, digits" in result.stderr


def test_folders_and_quoted_globs_are_expanded(server, digit_files, tmp_path: Path) -> None:
    folder = digit_files[0][0].parent
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "deep.png").write_bytes(digit_files[0][0].read_bytes())
    result = nnserve("predict", "digits", folder, f"{tmp_path}/**/*.png", "--output", "csv", url=server.url)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert [row["file"] for row in rows] == [*sorted(str(p) for p, _ in digit_files), str(nested / "deep.png")]
    assert list(rows[0]) == ["file", "index", "label", "probability", "error"]
    assert all(row["error"] == "" and row["label"] == row["index"] for row in rows)


def test_global_options_go_before_or_after_the_command(server) -> None:
    before = nnserve("--url", server.url, "--output", "json", "health")
    after = nnserve("health", "--url", server.url, "--json")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout) == {"status": "ok", "ready": True}
    # Written after the command, an option wins over the same option written before it.
    assert nnserve("--url", "http://127.0.0.1:9", "models", "--url", server.url).returncode == 0


def test_version_and_help_for_every_option() -> None:
    from nnserve_client import __version__
    from nnserve_client.cli import _parser

    version = nnserve("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"nnserve-client {__version__}"
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"health", "models", "predict", "forecast"}
    for name, command in [("nnserve", parser), *commands.items()]:
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        assert nnserve(*([] if name == "nnserve" else [name]), "--help").returncode == 0
