"""The OpenAPI document of the POST routes, built from the pydantic request models.

The routes read their bodies themselves (size limit, JSON depth limit, the OpenAI error
envelope), so FastAPI cannot infer their schemas; this document states them for clients and
for fuzzers (tests/e2e/test_contract_fuzz.py runs schemathesis against GET /openapi.json).
"""

from __future__ import annotations

from typing import Any

from deepserve.server import protocol as P

POST_ROUTES = {"/v1/chat/completions": P.ChatCompletionRequest, "/v1/completions": P.CompletionRequest,
               "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest}
_ERROR = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}


def _operation(model: type) -> dict[str, Any]:
    body = {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return {"post": {"requestBody": body, "responses": {
        "200": {"description": "the result (JSON, or server-sent events when streaming)"},
        "4XX": _ERROR, "5XX": _ERROR}}}


def openapi_document(version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in POST_ROUTES.values():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return {"openapi": "3.1.0", "info": {"title": "deepserve", "version": version},
            "paths": {path: _operation(model) for path, model in POST_ROUTES.items()},
            "components": {"schemas": components}}
