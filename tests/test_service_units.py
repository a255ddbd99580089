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
    ("s3cret", "Bearer s3cre", 403), ("s3cret", "Bearer s3cret!", 403)])
def test_admin_token_check(token, auth, status):
    with pytest.raises(BadRequest) as e:
        _authorize(_request(auth), token)
    assert e.value.status == status


def test_admin_token_accepts_the_right_token():
    _authorize(_request("Bearer s3cret"), "s3cret")
    _authorize(_request("bearer s3cret"), "s3cret")
