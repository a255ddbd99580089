"""The OpenAPI 3 description of /v1 and /v2, merged into BentoML's `/docs.json` (its Swagger UI at `/`).

BentoML documents only its own endpoints (/healthz /livez /readyz /metrics) and not mounted ASGI
apps, so `OpenAPIMiddleware` (added with `Service.add_asgi_middleware`) takes BentoML's document on
its way out and adds our paths and component schemas to it.
"""
from __future__ import annotations

import json

_JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict, *, binary: bool = False, desc: str = "") -> dict:
    content = {_JSON: {"schema": schema}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"required": True, "content": content, **({"description": desc} if desc else {})}


def _ok(schema: dict, desc: str = "OK", *, binary: bool = False) -> dict:
    return {"200": {"description": desc, "content": _body(schema, binary=binary)["content"]},
            "4XX": {"description": "bad input (nothing changed)",
                    "content": {_JSON: {"schema": _ref("Error")}}},
            "503": {"description": "not ready or state backend unavailable (Retry-After; X-Lorasa-Retry-Safe: 1 "
                           "when nothing changed)", "content": {_JSON: {"schema": _ref("Error")}}}}


def _op(tag: str, summary: str, responses: dict, body: dict | None = None, params: list | None = None,
        admin: bool = False) -> dict:
    op = {"tags": [tag], "summary": summary, "responses": responses}
    if body:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    if admin:
        op["security"] = [{"adminToken": []}]
    return op


def _path_param(name: str, desc: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": desc}


_NUMS = {"type": "array", "items": {"type": "number"}}
_SESSION_STATE = {"type": "string", "enum": ["resumed", "new"],
                  "description": "session steps only: resumed (the session's stored state was found), or new "
                                 "(none was: its first step, or it expired, was evicted or reset, or the "
                                 "server's state store lost it: every row started from a zero state)"}
SCHEMAS: dict[str, dict] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "ActRow": {"type": "object", "required": ["agent_id", "obs"], "additionalProperties": False,
               "properties": {"agent_id": {"type": "string"},
                              "obs": {**_NUMS, "description": "the agent's obs_dim numbers, or more up to "
                                                              "obs_max with zeros past obs_dim"},
                              "avail_actions": {"type": "array", "items": {"type": "integer", "enum": [0, 1]},
                                                "description": "categorical only: act_dim up to act_max values "
                                                               "0/1 (past act_dim: ignored)"},
                              "state": {**_NUMS,
                                        "description": "recurrent state [hidden]; not with a session"},
                              "reset": {"type": "boolean", "default": False}}},
    "ActRequest": {"type": "object", "required": ["rows"], "additionalProperties": False,
                   "properties": {"rows": {"type": "array", "minItems": 1, "items": _ref("ActRow")},
                                  "session_id": {"type": "string", "minLength": 1, "maxLength": 128},
                                  "deterministic": {"type": "boolean", "default": True}}},
    "ActResponse": {"type": "object", "required": ["actions", "log_probs", "versions", "batch"],
                    "properties": {"actions": {"type": "array", "items": {
                        "oneOf": [{"type": "integer"}, _NUMS]}},
                        "log_probs": _NUMS, "versions": {"type": "array", "items": {"type": "integer"}},
                        "state": {"type": "array", "items": _NUMS},
                        "batch": {"type": "object", "properties": {"requests": {"type": "integer"},
                                                                   "rows": {"type": "integer"}}},
                        "session_state": _SESSION_STATE}},
    "SessionReset": {"type": "object", "properties": {"session_id": {"type": "string"},
                                                      "existed": {"type": "boolean"}}},
    "Agents": {"type": "object", "properties": {
        "backbone_fingerprint": {"type": "string"},
        "agents": {"type": "array", "items": {"type": "object", "properties": {
            "agent_id": {"type": "string"}, "obs_dim": {"type": "integer"}, "act_dim": {"type": "integer"},
            "version": {"type": "integer"}, "adapter_fingerprint": {"type": "string"},
            "merged": {"type": "boolean"}, "auto_merged": {"type": "boolean"}}}},
        "state_error": {"type": "string", "nullable": True, "description": "why this worker's check of the state "
                        "backend fails now (stateless requests are served with the adapters last applied)"},
        "sessions_error": {"type": "string", "nullable": True, "description": "why the last session call could not "
                           "reach the session store (session steps answer 503 with Retry-After meanwhile)"}}},
    "PolicySpec": {"type": "object", "description": "policy.json: sizes, agents, LoRA spec",
                   "additionalProperties": True},
    "AdapterPublished": {"type": "object", "properties": {"agent_id": {"type": "string"},
                                                          "version": {"type": "integer"},
                                                          "served_version": {"type": "integer"}}},
    "MergeRequest": {"type": "object", "properties": {"agent_ids": {"type": "array",
                                                                    "items": {"type": "string"}}}},
    "Merged": {"type": "object", "properties": {"merged": {"type": "array", "items": {"type": "string"}}}},
    # --- Open Inference Protocol ---
    "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"],
                       "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                      "extensions": {"type": "array", "items": {"type": "string"}}}},
    "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}}},
    "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer"}}}},
    "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                      "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                                     "versions": {"type": "array", "items": {"type": "string"}},
                                     "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                                     "outputs": {"type": "array", "items": _ref("TensorMetadata")},
                                     "parameters": {"type": "object"}}},
    "InferInputTensor": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "description": "agent_id BYTES [B] | agent_index INT64 [B]; obs FP32 [B, obs_max] (zero past the "
                       "agent's obs_dim); state FP32 [B, hidden]; reset BOOL [B]; avail BOOL [B, act_max]",
        "properties": {"name": {"type": "string", "enum": ["agent_id", "agent_index", "obs", "state",
                                                           "reset", "avail"]},
                       "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                       "datatype": {"type": "string", "enum": ["BYTES", "INT64", "INT32", "FP32", "BOOL"]},
                       "parameters": {"type": "object", "properties": {
                           "binary_data_size": {"type": "integer", "minimum": 0}}},
                       "data": {"type": "array", "description": "row-major, flat or nested"}}},
    "InferRequestedOutput": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "enum": ["action", "log_prob", "state_out", "version"]},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}},
    "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "model_name": {"type": "string", "description": "optional; must equal the URL's model"},
        "model_version": {"type": "string", "description": "optional; must equal the URL's version (1)"},
        "parameters": {"type": "object", "additionalProperties": False, "properties": {
            "deterministic": {"type": "boolean", "default": True},
            "session_id": {"type": "string", "minLength": 1, "maxLength": 128},
            "seed": {"type": "integer", "minimum": 0, "description": "sampling seed (not deterministic)"},
            "binary_data_output": {"type": "boolean", "default": False},
            "timeout": {"type": "integer", "minimum": 0, "description": "tritonclient's hint: ignored"},
            "priority": {"type": "integer", "minimum": 0, "description": "tritonclient's hint: ignored"}}},
        "inputs": {"type": "array", "items": _ref("InferInputTensor")},
        "outputs": {"type": "array", "items": _ref("InferRequestedOutput")}}},
    "InferOutputTensor": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "description": "action FP32 [B, act_max] (Gaussian) | INT64 [B] (Categorical); log_prob FP32 [B]; "
                       "state_out FP32 [B, hidden]; version INT64 [B]",
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                       "shape": {"type": "array", "items": {"type": "integer"}},
                       "parameters": {"type": "object", "properties": {
                           "binary_data_size": {"type": "integer"}}},
                       "data": {"type": "array"}}},
    "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"session_state": _SESSION_STATE}},
        "outputs": {"type": "array", "items": _ref("InferOutputTensor")}}},
}

_HLEN = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "schema": {"type": "integer", "minimum": 0},
         "description": "binary tensor data extension: length of the JSON header at the start of the "
                        "body; the binary tensors follow it"}
_MODEL = [_path_param("model", "the model name (LORASA_MODEL_NAME, default lorasa_policy)")]
_VERSION = [_path_param("version", "the model version (1)")]


def paths() -> dict[str, dict]:
    v1 = "v1 (JSON)"
    p: dict[str, dict] = {
        "/v1/act": {"post": _op(v1, "Act on a mixed batch of rows (agents of many environments)",
                                _ok(_ref("ActResponse")), _body(_ref("ActRequest")))},
        "/v1/sessions/{session_id}/reset": {"post": _op(
            v1, "Forget a session's recurrent state", _ok(_ref("SessionReset")),
            params=[_path_param("session_id", "1-128 characters")])},
        "/v1/agents": {"get": _op(v1, "Agents with adapter versions, fingerprints, merged flags",
                                  _ok(_ref("Agents")))},
        "/v1/policy": {"get": _op(v1, "The served policy spec (policy.json)", _ok(_ref("PolicySpec")))},
        "/v1/admin/adapters/{agent_id}": {"put": _op(
            v1, "Upload or replace an agent's adapter (safetensors), validated then hot-swapped",
            _ok(_ref("AdapterPublished")),
            {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            [_path_param("agent_id", "a served agent")], admin=True)},
        "/v1/admin/merge": {"post": _op(v1, "Merge agents' adapters into cached weights", _ok(_ref("Merged")),
                                        {"required": False,
                                         "content": {_JSON: {"schema": _ref("MergeRequest")}}},
                                        admin=True)},
        "/v1/admin/unmerge": {"post": _op(v1, "Back to unmerged (low-rank) serving", _ok(_ref("Merged")),
                                          {"required": False,
                                           "content": {_JSON: {"schema": _ref("MergeRequest")}}},
                                          admin=True)},
    }
    v2 = "v2 (Open Inference Protocol)"
    meta = _op(v2, "Server metadata (extensions: binary_tensor_data)", _ok(_ref("ServerMetadata")))
    p["/v2"] = {"get": meta}
    p["/v2/health/live"] = {"get": _op(v2, "Server live", _ok(_ref("Live")))}
    p["/v2/health/ready"] = {"get": _op(v2, "Server ready (policy loaded)", _ok(_ref("Ready")))}
    for base, params in (("/v2/models/{model}", _MODEL), ("/v2/models/{model}/versions/{version}",
                                                          _MODEL + _VERSION)):
        p[base] = {"get": _op(v2, "Model metadata: inputs and outputs with datatypes and shapes",
                              _ok(_ref("ModelMetadata")), params=params)}
        p[base + "/ready"] = {"get": _op(v2, "Model ready", _ok(_ref("Ready")), params=params)}
        p[base + "/infer"] = {"post": _op(
            v2, "Inference: JSON tensors, or binary tensors after a JSON header",
            _ok(_ref("InferResponse"), "outputs (binary ones after the JSON header, whose length is in "
                                       "Inference-Header-Content-Length)", binary=True),
            _body(_ref("InferRequest"), binary=True,
                  desc="JSON, or a JSON header followed by binary tensors (see the header parameter)"),
            params + [_HLEN])}
    return p


def _nullable_30(node):
    """OpenAPI 3.0 has no `{"type": "null"}` (BentoML writes it in `anyOf` for optional fields):
    `{"anyOf": [X, {"type": "null"}]}` -> X with `nullable: true`, recursively."""
    if isinstance(node, list):
        return [_nullable_30(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_30(v) for k, v in node.items()}
    for key in ("anyOf", "oneOf"):
        alts = node.get(key)
        if isinstance(alts, list) and {"type": "null"} in alts:
            rest = [a for a in alts if a != {"type": "null"}]
            del node[key]
            node.update(rest[0] if len(rest) == 1 else {key: rest})
            node["nullable"] = True
    return node


def extend(doc: dict) -> dict:
    """BentoML's document (made valid OpenAPI 3.0) plus /v1 and /v2 (paths, schemas, the admin
    bearer token)."""
    if str(doc.get("openapi", "3.0")).startswith("3.0"):
        doc = _nullable_30(doc)
    doc.setdefault("openapi", "3.0.2")
    doc.setdefault("info", {"title": "lorasa_policy", "version": "0.1.0"})
    doc.setdefault("paths", {}).update(paths())
    comps = doc.setdefault("components", {})
    comps.setdefault("schemas", {}).update(SCHEMAS)
    comps.setdefault("securitySchemes", {})["adminToken"] = {
        "type": "http", "scheme": "bearer", "description": "LORASA_ADMIN_TOKEN"}
    tags = doc.setdefault("tags", [])
    for name, desc in (("v1 (JSON)", "lorasa JSON API"),
                       ("v2 (Open Inference Protocol)", "KServe v2 / Open Inference Protocol with "
                                                        "the binary tensor data extension")):
        if not any(t.get("name") == name for t in tags):
            tags.append({"name": name, "description": desc})
    return doc


class OpenAPIMiddleware:
    """ASGI middleware: a 200 JSON answer to GET /docs.json gets our paths and schemas added."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = json.dumps(extend(json.loads(body))).encode()
            except ValueError:
                pass  # not JSON: pass BentoML's answer through unchanged
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "type": "http.response.start", "headers": headers})
        await send({"type": "http.response.body", "body": body})
