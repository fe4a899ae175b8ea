"""Dynamic batching that costs nothing when idle and adds no wait when a batch is already there.

LitServe's batched loop polls its queue every millisecond while idle (a busy spin when `batch_timeout` is 0)
and always waits the full `batch_timeout` once a request arrives. On a small CPU machine both cost more
than the models. This loop blocks for the first request, takes every request already queued, and waits
up to `batch_timeout` for more only while the batch is not full. Under load, requests pile up while the
previous batch runs, so batches form without any added delay.
"""

from __future__ import annotations

import time
from queue import Empty, Queue
from typing import Any

from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport

IDLE_POLL_S = 1.0  # how often an idle worker wakes to notice shutdown


class DrainingLoop(BatchedLoop):
    def get_batch_requests(
        self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport
    ) -> tuple[list[Any], list[Any]]:
        try:
            pending = [request_queue.get(timeout=IDLE_POLL_S)]
        except Empty:
            return [], []
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(pending) < lit_api.max_batch_size:
            try:
                pending.append(request_queue.get_nowait())
            except Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending.append(request_queue.get(timeout=remaining))
                except Empty:
                    break

        batch, timed_out = [], []
        now = time.monotonic()
        for item in pending:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, submitted, payload = item
            if lit_api.request_timeout not in (-1, False) and now - submitted > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                batch.append((response_queue_id, uid, payload))
        return batch, timed_out
