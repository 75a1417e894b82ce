"""Property-based fuzzing of the live server against its own published schema (schemathesis, loopback only):
every operation, a bounded number of generated requests each (deterministic), every answer within the schema
(status codes, content types, bodies), no 5xx, no hang, and the server still answering correctly afterwards."""

from __future__ import annotations

import threading
import time

import pytest

from behemoth.inference.runner import Runner
from behemoth.inference.server import make_server

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = 100  # per operation
BUDGET_S = 120  # the whole run; about 10 s on a 2-core CPU


def test_schema_fuzz(char_model_dir):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    runner = Runner.load(char_model_dir)
    # a small limit and context keep each generated request cheap
    srv, engine = make_server(runner, port=0, model_name="tiny", max_tokens_limit=4, max_len=64, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        start, seen = time.monotonic(), {}
        for result in schema.get_all_operations():
            op = result.ok()
            seen[op.label] = 0

            @hypothesis.given(case=op.as_strategy())
            @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            def check(case):
                assert time.monotonic() - start < BUDGET_S, "the fuzz run is over its time budget"
                seen[case.operation.label] += 1
                if isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "tiny"  # reach generation, not only the unknown-model 404
                response = case.call(base_url=url, timeout=30)  # a hang fails here
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                         status_code_conformance, content_type_conformance])

            check()
        assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
                "GET /tokenizer_info", "GET /health", "GET /v1/models"} <= set(seen)
        assert all(n > 0 for n in seen.values()) and engine.stats.completed > 0, (seen, engine.stats)
        # still healthy: a plain request gets the model's own answer
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="Q:", max_tokens=4, temperature=0).usage.total_tokens
        assert engine.active == 0
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
