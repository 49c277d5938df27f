"""Client input never produces a 5xx: schemathesis fuzzes the request bodies of the POST routes.

The OpenAPI document is built here from the pydantic request models (the server itself publishes
none); generated bodies are mostly invalid, and every answer must be < 500 and JSON.
"""

from __future__ import annotations

import pytest

from deepserve.server import protocol as P

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

SERVER_ARGS = ["--max-model-len", "256"]
ROUTES = {"/v1/chat/completions": P.ChatCompletionRequest, "/v1/completions": P.CompletionRequest,
          "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest}


def openapi_document() -> dict:
    paths, components = {}, {}
    for path, model in ROUTES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        body = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        paths[path] = {"post": {"requestBody": body, "responses": {"200": {"description": "ok"}}}}
    return {"openapi": "3.1.0", "info": {"title": "deepserve", "version": "0"}, "paths": paths,
            "components": {"schemas": components}}


schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def base_url(server):
    return server.url


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    case.body = case.body if not isinstance(case.body, dict) else case.body | {"max_tokens": 2}
    response = case.call(base_url=base_url, timeout=30)
    assert response.status_code < 500, response.text
    assert response.headers["content-type"][0].startswith(("application/json", "text/event-stream"))
