"""Schemathesis against the live server's own OpenAPI schema: every endpoint, generated valid and
invalid requests (a bounded number of examples each); no response is ever a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import LiveServer, launch
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # A short context keeps every generated request cheap on a CPU.
    server = launch(tmp_path_factory.mktemp("fuzz"), "fuzz", "--max-model-len", "40", "--load-format", "safetensors")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def operations(server: LiveServer) -> list:  # type: ignore[type-arg]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_makes_a_server_error(fuzz_server: LiveServer, mode: GenerationMode) -> None:
    ops = operations(fuzz_server)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/tokenize", "/health"}
    fuzzed = set()
    for op in ops:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=fuzz_server.url, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        try:
            check()
        except Unsatisfiable:
            # No invalid request exists for an operation without a body whose inputs take any value
            # (GET /health, DELETE /v1/responses/{any string}): nothing to fuzz.
            assert mode is GenerationMode.NEGATIVE and op.method.upper() in ("GET", "DELETE"), op.path
            continue
        fuzzed.add(op.path)
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"} <= fuzzed
