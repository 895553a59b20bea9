"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis, against the live `guard` app.

Bounded for CI (EXAMPLES per operation, derandomized so a failure reproduces). Every answer must
be free of 5xx and conform to the schema: status code, content type and body.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import API_KEY

EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def guard_schema(guard_url):
    return schemathesis.openapi.from_url(f"{guard_url}/openapi.json")


def test_the_schema_lists_every_route(guard_schema):
    assert {(op.ok().path, op.ok().method.upper()) for op in guard_schema.get_all_operations()} == {
        ("/v1/search", "POST"), ("/v1/retrievers", "GET"), ("/healthz", "GET")
    }


# schemathesis.pytest.from_fixture does not run on pytest 9 (it reads a removed private attribute),
# so each operation's strategy is drawn with hypothesis directly.
@pytest.mark.parametrize(("path", "method"), [("/v1/search", "POST"), ("/v1/retrievers", "GET"), ("/healthz", "GET")])
def test_the_api_answers_its_own_schema_without_5xx(guard_schema, guard_url, path, method):
    operation = guard_schema[path][method]
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        response = case.call_and_validate(
            base_url=guard_url, headers={"authorization": f"Bearer {API_KEY}"}, checks=CHECKS
        )
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    fuzz()
    print(f"\n{method} {path}: status codes {seen}")
    assert seen and max(seen) < 500
