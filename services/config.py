"""Service configuration, read once per process from environment variables (typed, validated).

Every knob has a safe default, so `bentoml serve` from the repo root needs no arguments.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

DEFAULT_POLICY = "policies/halfcheetah_2x3"
DEFAULT_MODEL_NAME = "lorasa_policy"
MODEL_NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one URL path segment: /v2/models/<name>
ENV_PREFIX = "LORASA_"
# BentoML records an OpenTelemetry span per request and per body chunk even with no exporter
# configured; the act routes are left out of tracing (BentoML's `tracing.excluded_urls`: regexes
# searched in the URL) unless LORASA_TRACE_ACT=1: BENCHMARKS.md, Protocols, has what that costs
UNTRACED_PATHS = ("/v1/act$", "/v2/models/[^/]+(/versions/[^/]+)?/infer$")


@dataclass(frozen=True)
class ServiceConfig:
    policy: str = DEFAULT_POLICY  # LORASA_POLICY: a policy directory
    model_tag: str = ""  # LORASA_MODEL_TAG: a BentoML model tag; wins over `policy` when set
    state_dir: str = ""  # LORASA_STATE_DIR: local state backend: adapters + sessions ("" = per-server temp dir)
    redis_url: str = ""  # LORASA_REDIS_URL: redis://[:password@]host:port/db or rediss://; "" = local backend
    session_ttl_s: float = 3600.0  # LORASA_SESSION_TTL_S: a session unused this long is forgotten
    max_session_bytes: int = 256 << 20  # LORASA_MAX_SESSION_BYTES: bytes of session state kept (LRU past it)
    metrics_dir: str = ""  # LORASA_METRICS_DIR: this server's prometheus multiprocess dir ("" = temp dir)
    arbiter_check_s: float = 1.0  # LORASA_ARBITER_CHECK_S: how often BentoML's arbiter replaces dead workers
    admin_token: str = ""  # LORASA_ADMIN_TOKEN: bearer token for /v1/admin/*; "" = admin disabled
    workers: int = 1  # LORASA_WORKERS: BentoML worker processes
    device: str = "cpu"  # LORASA_DEVICE: "cpu", "cuda", "auto"
    mode: str = "auto"  # LORASA_MODE: engine adapter mode "auto" | "lora" | "merged"
    backend: str = "engine"  # LORASA_BACKEND: "engine" (policy dir, hot swap) | "onnx" (a lorasa-export dir)
    max_rows_per_request: int = 1024  # LORASA_MAX_ROWS_PER_REQUEST
    max_batch_rows: int = 4096  # LORASA_MAX_BATCH_ROWS: rows batched into one engine forward
    inline_max_rows: int = 64  # LORASA_INLINE_MAX_ROWS: stateless requests up to this many rows (together) are
    # served by a cycle on the event loop, merged with those arriving with them (no thread hand-off);
    # 0 = always through the batcher thread
    max_body_bytes: int = 8 << 20  # LORASA_MAX_BODY_BYTES: JSON request bodies
    max_upload_bytes: int = 16 << 20  # LORASA_MAX_UPLOAD_BYTES: adapter uploads
    max_sessions: int = 10_000  # LORASA_MAX_SESSIONS: live sessions before LRU eviction
    timeout_s: float = 30.0  # LORASA_TIMEOUT_S: BentoML request timeout
    torch_threads: int = 1  # LORASA_TORCH_THREADS: intra-op threads per worker (see README)
    access_log: int = 0  # LORASA_ACCESS_LOG: 1 = BentoML logs one INFO line per request
    trace_act: int = 0  # LORASA_TRACE_ACT: 1 = BentoML's OpenTelemetry spans also on the act routes
    model_name: str = DEFAULT_MODEL_NAME  # LORASA_MODEL_NAME: the one model of /v2 (/v2/models/<name>)

    def __post_init__(self) -> None:
        for name in ("workers", "torch_threads", "max_rows_per_request", "max_batch_rows", "max_body_bytes",
                     "max_upload_bytes", "max_sessions", "max_session_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be >= 1")
        if self.inline_max_rows < 0:
            raise ValueError(f"{ENV_PREFIX}INLINE_MAX_ROWS must be >= 0")
        if self.max_batch_rows < self.max_rows_per_request:
            raise ValueError("LORASA_MAX_BATCH_ROWS must be >= LORASA_MAX_ROWS_PER_REQUEST")
        for name in ("access_log", "trace_act"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be 0 or 1, not {getattr(self, name)}")
        tok = self.admin_token
        if tok and not (tok.isascii() and tok.isprintable() and not any(c.isspace() for c in tok)):
            raise ValueError("LORASA_ADMIN_TOKEN must be printable ASCII without spaces (it is compared "
                             "exactly with the 'Authorization: Bearer <token>' header); remove the "
                             "whitespace around or in it")
        if self.session_ttl_s <= 0 or self.arbiter_check_s <= 0:
            raise ValueError("LORASA_SESSION_TTL_S and LORASA_ARBITER_CHECK_S must be > 0")
        if self.backend not in ("engine", "onnx"):
            raise ValueError(f"LORASA_BACKEND must be engine or onnx, not {self.backend!r}")
        if self.mode not in ("auto", "lora", "merged"):
            raise ValueError(f"LORASA_MODE must be auto, lora or merged, not {self.mode!r}")
        if not MODEL_NAME_RULE.fullmatch(self.model_name):
            raise ValueError(f"LORASA_MODEL_NAME must be 1-128 characters from A-Z a-z 0-9 . _ - (not starting "
                             f"with . _ -; it is a URL path segment), not {self.model_name[:140]!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if environ is None else environ
        kwargs = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "" and f.type != "str":
                continue
            try:
                kwargs[f.name] = {"int": int, "float": float}.get(f.type, str)(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {f.type}") from None
        return cls(**kwargs)

    def __repr__(self) -> str:  # secrets never reach a log line
        from .state.base import redact
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown.update(admin_token="***" if self.admin_token else "", redis_url=redact(self.redis_url))
        return f"ServiceConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
