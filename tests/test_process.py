"""How the supervisor forks: the child starts with everything it inherited frozen out of the garbage collector."""

from __future__ import annotations

import gc
import multiprocessing as mp
from multiprocessing.connection import Connection

from service import process


def _report_freeze(conn: Connection) -> None:
    conn.send(gc.get_freeze_count())
    conn.close()


def test_forked_child_inherits_a_frozen_heap() -> None:
    inherited = [[i] for i in range(10_000)]  # tracked objects made before the fork
    reader, writer = mp.get_context("fork").Pipe(duplex=False)
    try:
        child = process.fork(_report_freeze, (writer,), "nnserve-test")
        frozen = reader.recv()
        child.join(10)
        assert child.exitcode == 0
        # Every object alive at the fork is frozen, so a full collection in the child would not walk them.
        assert frozen >= len(inherited)
    finally:
        gc.unfreeze()  # this test's process is not a server: give its objects back to the collector
