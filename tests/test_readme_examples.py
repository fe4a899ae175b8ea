"""Every shell and Python example in the READMEs, run as written from examples/ against a real server.

Only the address changes: `localhost:8000` becomes the test server's. `curl` fails on an HTTP error status
(`--fail-with-body`) and `nnserve` is this checkout's client, so each block passes only if every command in it
succeeds. Blocks that cannot run here are listed in EXCLUDED with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serving import ROOT, RunningServer

EXAMPLES = ROOT / "examples"
READMES = ("README.md", "clients/python/README.md")
RUNNERS = {"bash": "bash", "python": "python"}
SHOWN_ONLY = {"json"}  # what an answer looks like, not something to run

EXCLUDED: dict[tuple[str, str], str] = {
    # (README, text of the block's first line): why the block does not run here
    ("README.md", "make serve"): "creates .venv and installs packages; `make test` runs this very suite",
    ("README.md", ".venv/bin/python -m training digits"): "trains models: minutes to hours on a CPU, and "
    "`--device cuda` needs a GPU",
    ("README.md", "docker compose --profile cpu up -d"): "needs a Docker engine (the NVIDIA Container Toolkit for the "
    "GPU service, a cluster for kubectl): `make test-docker` runs these commands against a real engine",
    ("clients/python/README.md", "pip install ./clients/python"): "installs into the current environment; the "
    "suite runs against this checkout",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    readme: str
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.readme}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0] if self.code else ""


def readme_blocks() -> list[Block]:
    blocks = []
    for readme in READMES:
        text = (ROOT / readme).read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(readme, line, match.group(1), match.group(2)))
    return blocks


def _exclusion(block: Block) -> str | None:
    reasons = [why for (readme, first), why in EXCLUDED.items() if readme == block.readme and first in block.first_line]
    return reasons[0] if reasons else None


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.language in RUNNERS and _exclusion(b) is None]


def test_every_block_runs_or_is_excluded_for_a_listed_reason() -> None:
    for block in BLOCKS:
        assert block.language in {*RUNNERS, *SHOWN_ONLY}, f"{block.id}: a ```{block.language} block nothing runs"
    for readme, first in EXCLUDED:
        matches = [b for b in BLOCKS if b.readme == readme and first in b.first_line]
        assert len(matches) == 1, f"exclusion ({readme}, {first!r}) matches {len(matches)} blocks, not 1"
    assert {b.readme for b in RUNNABLE} == set(READMES)
    assert sum(b.language == "python" for b in RUNNABLE) >= 3 and sum(b.language == "bash" for b in RUNNABLE) >= 3


def test_the_example_inputs_are_small() -> None:
    files = [f for f in EXAMPLES.rglob("*") if f.is_file()]
    for name in ("digit.png", "cat.png", "ship.png", "weather.csv"):
        assert (EXAMPLES / name).is_file(), name
    assert sum(f.stat().st_size for f in files) < 200_000


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with an `nnserve` command that runs this checkout's client under this interpreter."""
    folder = tmp_path_factory.mktemp("bin")
    command = folder / "nnserve"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nnserve_client "$@"\n')
    command.chmod(0o755)
    return folder


def _as_run_here(code: str, server: RunningServer) -> str:
    address = server.url.removeprefix("http://")
    return code.replace("localhost:8000", address).replace("127.0.0.1:8000", address)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_example_runs(block: Block, server: RunningServer, shim: Path) -> None:
    code = _as_run_here(block.code, server)
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "clients" / "python"),
        "NNSERVE_URL": server.url,
    }
    env.pop("NNSERVE_API_KEY", None)
    if block.language == "bash":
        prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body --show-error "$@"; }\n'
        command = ["bash", "-c", prelude + code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=180)
    report = f"{block.id} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr and result.stdout.strip(), report
