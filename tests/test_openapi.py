"""The OpenAPI document tells the truth: schemathesis checks the live server against it, and hand-picked requests
compare what it says with what the server does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.serving import RunningServer, running_server

load_all_checks()

API_KEY = "openapi-test-key"
SEED = 20261125
EXAMPLES = 8  # per operation and generation mode
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    with running_server(NNSERVE_API_KEY=API_KEY) as srv:
        yield srv


def test_the_server_keeps_to_its_document(keyed_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(f"{keyed_server.url}/openapi.json")
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @seed(SEED)
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                response = case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS, timeout=30)
                seen[case.operation.label, response.status_code] += 1

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, f"{operation.label}: no valid request"
            except Exception as e:
                failures.append(f"{operation.label} ({mode}): {e}")
    print("\n".join(f"{label} {status}: {n}" for (label, status), n in sorted(seen.items())))
    assert not failures, "\n\n".join(failures)
