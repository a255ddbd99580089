"""Service building blocks in-process (fast): configuration parsing, the admin token check.
(The state backends are tested in tests/test_state_backends.py.)"""
from __future__ import annotations

import pytest
from conftest import require_extra

require_extra("serve", "starlette", "bentoml")
from starlette.requests import Request  # noqa: E402

from services.config import ServiceConfig  # noqa: E402
from services.http import _authorize  # noqa: E402
from services.schema import BadRequest  # noqa: E402


@pytest.mark.parametrize("name,ok", [("lorasa_policy", True), ("team-7.v2", True), ("", False), ("a/b", False),
                                     ("_x", False), ("x" * 129, False), ("x" * 128, True), ("my model", False)])
def test_model_name_is_one_url_path_segment(name, ok):
    """LORASA_MODEL_NAME is read with every other setting (typed, checked at start): what /v2 serves."""
    if ok:
        assert ServiceConfig.from_env({"LORASA_MODEL_NAME": name}).model_name == name
    else:
        with pytest.raises(ValueError, match="LORASA_MODEL_NAME must be 1-128 characters"):
            ServiceConfig.from_env({"LORASA_MODEL_NAME": name})
    assert ServiceConfig.from_env({}).model_name == "lorasa_policy"


def test_v2_answers_for_the_configured_model_name_only():
    """The /v2 app takes its model name from the config: another name is a 404; the configured one
    reaches the policy (503 while none is loaded)."""
    from starlette.testclient import TestClient

    from services.http import NotReady
    from services.oip import build_oip_app

    async def loading():
        raise NotReady("the policy is still loading")

    client = TestClient(build_oip_app(ServiceConfig(model_name="team-7"), loading))
    r = client.get("/models/lorasa_policy/ready")
    assert r.status_code == 404 and "serving 'team-7'" in r.json()["error"]
    assert client.get("/models/team-7/ready").status_code == 503
    assert client.get("/models/team-7/versions/1").status_code == 503


def test_config_from_env_validates():
    cfg = ServiceConfig.from_env({"LORASA_WORKERS": "2", "LORASA_POLICY": "p", "LORASA_TIMEOUT_S": "5"})
    assert cfg.workers == 2 and cfg.policy == "p" and cfg.timeout_s == 5.0
    assert ServiceConfig.from_env({}).policy == "policies/halfcheetah_2x3"
    with pytest.raises(ValueError, match="LORASA_WORKERS"):
        ServiceConfig.from_env({"LORASA_WORKERS": "two"})
    cfg = ServiceConfig.from_env({"LORASA_SESSION_TTL_S": "60", "LORASA_MAX_SESSION_BYTES": "4096",
                                  "LORASA_REDIS_URL": "redis://:pw@h:6379/1"})
    assert (cfg.session_ttl_s, cfg.max_session_bytes, cfg.redis_url) == (60.0, 4096, "redis://:pw@h:6379/1")
    with pytest.raises(ValueError, match="LORASA_SESSION_TTL_S"):
        ServiceConfig.from_env({"LORASA_SESSION_TTL_S": "0"})
    with pytest.raises(ValueError, match="LORASA_MAX_SESSION_BYTES"):
        ServiceConfig.from_env({"LORASA_MAX_SESSION_BYTES": "0"})
    with pytest.raises(ValueError, match="LORASA_MAX_BATCH_ROWS"):
        ServiceConfig.from_env({"LORASA_MAX_BATCH_ROWS": "2", "LORASA_MAX_ROWS_PER_REQUEST": "8"})


def _request(auth: str | None) -> Request:
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    return Request({"type": "http", "method": "PUT", "path": "/", "headers": headers})


@pytest.mark.parametrize("token,auth,status", [
    ("", "Bearer anything", 403), ("s3cret", None, 401), ("s3cret", "Basic s3cret", 401),
    ("s3cret", "Bearer s3cre", 403), ("s3cret", "Bearer s3cret!", 403),
    # compared exactly: no trimming of any kind of whitespace
    ("s3cret", "Bearer s3cret\x1f", 403), ("s3cret", "Bearer s3cret\xa0", 403), ("s3cret", "Bearer s3cret\t", 403),
    ("s3cret", "Bearer  s3cret", 403), ("s3cret", "Bearer s3cret ", 403), ("s3cret", "Bearer\ts3cret", 401)])
def test_admin_token_check(token, auth, status):
    with pytest.raises(BadRequest) as e:
        _authorize(_request(auth), token)
    assert e.value.status == status


@pytest.mark.parametrize("token", [" s3cret", "s3cret\n", "s3 cret", "s3cret\x1f", "s3cr\xe9t"])
def test_admin_token_with_whitespace_is_refused_at_config_load(token):
    with pytest.raises(ValueError, match="LORASA_ADMIN_TOKEN must be printable ASCII without spaces"):
        ServiceConfig.from_env({"LORASA_ADMIN_TOKEN": token})


@pytest.mark.parametrize("name", ["LORASA_ACCESS_LOG", "LORASA_TRACE_ACT"])
def test_on_off_settings(name):
    field = name.removeprefix("LORASA_").lower()
    assert getattr(ServiceConfig.from_env({}), field) == 0
    assert getattr(ServiceConfig.from_env({name: "1"}), field) == 1
    with pytest.raises(ValueError, match=name):
        ServiceConfig.from_env({name: "2"})


@pytest.mark.parametrize("path,untraced", [
    ("/v1/act", True), ("/v2/models/lorasa_policy/infer", True), ("/v2/models/m/versions/1/infer", True),
    ("/v1/actions", False), ("/v1/agents", False), ("/v1/sessions/s1/reset", False),
    ("/v2/models/lorasa_policy", False), ("/v2/models/lorasa_policy/ready", False), ("/v2/health/live", False),
    ("/v2/models/a/b/infer", False), ("/v1/admin/adapters/agent_0", False)])
def test_only_the_act_routes_are_left_out_of_tracing(path, untraced):
    """BentoML's OpenTelemetry middleware skips URLs matching `tracing.excluded_urls` (searched as
    regexes in the full URL), the way it reads them from the service config."""
    from opentelemetry.util.http import ExcludeList
    from services.config import UNTRACED_PATHS
    assert ExcludeList(list(UNTRACED_PATHS)).url_disabled(f"http://127.0.0.1:3000{path}") == untraced


def test_admin_token_accepts_the_right_token():
    _authorize(_request("Bearer s3cret"), "s3cret")
    _authorize(_request("bearer s3cret"), "s3cret")


@pytest.mark.parametrize("exc,safe", [("NotReady", True), ("StateUnavailable", True),
                                      ("StateOutcomeUnknown", False)])
def test_503s_are_marked_retry_safe_only_when_nothing_happened(exc, safe):
    """_guard's mapping: a 503 raised before anything changed carries X-Lorasa-Retry-Safe: 1 (the
    client re-sends session steps only then); a step whose new state may have been stored does not."""
    import asyncio

    from services import http
    from services.state.base import StateOutcomeUnknown, StateUnavailable
    errors = {"NotReady": http.NotReady, "StateUnavailable": StateUnavailable,
              "StateOutcomeUnknown": StateOutcomeUnknown}

    async def handler(request):
        raise errors[exc]("the backend timed out")

    resp = asyncio.run(http._guard(handler)(Request({"type": "http", "method": "POST", "path": "/v1/act",
                                                     "headers": []})))
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.headers.get(http.RETRY_SAFE) == ("1" if safe else None)
    assert issubclass(StateOutcomeUnknown, StateUnavailable)


def test_a_bad_setting_stops_bentoml_serve_with_one_line():
    """LORASA_MODE=fast (any invalid LORASA_* value): one line on stderr naming it, exit 2, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "LORASA_MODE": "fast"}
    r = subprocess.run([str(bentoml), "serve", "--port", "0"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err == ["lorasa-serve: LORASA_MODE must be auto, lora or merged, not 'fast'"], \
        (r.returncode, r.stderr[-2000:])
