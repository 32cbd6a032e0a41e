"""Schemathesis fuzz of /openapi.json against a live server (fake engine + tiny encoders): whatever the
body, valid by the schema or not, the server never answers with a 5xx. Bounded: a few examples each."""
from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from .fake_engine import live_server
from .test_api import make_app

MAX_EXAMPLES = 8


@pytest.fixture(scope="module")
def api():
    app, _ = make_app(with_encoders=True)
    with live_server(app) as url:
        session = requests.Session()
        session.trust_env = False  # loopback only, never through a proxy from the environment
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        yield url, schema, session


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_covers_every_endpoint(api):
    _, schema, _ = api
    found = {(op.method.upper(), op.path) for op in operations(schema)}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
            ("POST", "/v1/classify"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/ready")} <= found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api, mode):
    url, schema, session = api
    statuses: dict[str, set[int]] = {}
    for operation in operations(schema):
        if operation.path == "/metrics" or (mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET"):
            continue  # GETs take no input: nothing to make invalid
        fuzz(operation, mode, url, session, statuses)
    assert statuses["/v1/completions"]  # the fuzzer did reach the endpoints
    if mode == GenerationMode.NEGATIVE:
        assert 400 in statuses["/v1/chat/completions"]  # invalid bodies were rejected, not crashed on


def fuzz(operation, mode, url: str, session, statuses: dict[str, set[int]]) -> None:
    """Call `operation` with MAX_EXAMPLES generated requests; no answer may be a 5xx."""

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        statuses.setdefault(operation.path, set()).add(response.status_code)
        assert response.status_code < 500, (case.body, response.status_code, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
