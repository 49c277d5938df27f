"""Client input never produces a 5xx: schemathesis fuzzes the POST routes of GET /openapi.json.

Generated bodies are mostly invalid; every answer must be < 500, JSON or SSE, and an error must
be the OpenAI envelope the document declares. 300 examples per route (about a minute or two on 2 cores) bound its time.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
import httpx  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from deepserve import __version__  # noqa: E402
from deepserve.server.openapi import openapi_document  # noqa: E402

SERVER_ARGS = ["--max-model-len", "256"]


@pytest.fixture(scope="module")
def base_url(server):
    return server.url


# The document the server serves at GET /openapi.json (checked equal below), loaded at import
# because schemathesis parametrizes at collection time.
schema = schemathesis.openapi.from_dict(openapi_document(__version__))


def test_served_document_is_the_fuzzed_one(base_url):
    assert httpx.get(f"{base_url}/openapi.json", timeout=10).json() == openapi_document(__version__)


@schema.parametrize()
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    case.body = case.body if not isinstance(case.body, dict) else case.body | {"max_tokens": 2}
    response = case.call(base_url=base_url, timeout=30)
    assert response.status_code < 500, response.text
    assert response.headers["content-type"][0].startswith(("application/json", "text/event-stream"))
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
