from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving import RunningServer, running_server


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One server on the committed models with default settings, shared by the whole run."""
    with running_server() as srv:
        yield srv
