"""BentoML service: `bentoml serve` (bentofile.yaml: services.service:LorasaPolicy).

Configured by LORASA_* environment variables (services/config.py). Each worker process loads the
policy in a background thread (`/readyz` is 503 until it is loaded), then serves the v1 API
(services/http.py) from a PolicyRuntime (services/runtime.py). BentoML provides the process
management, `/livez`, `/readyz`, `/metrics` (with ours from services/metrics.py), timeouts and logs.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import bentoml
import torch
from starlette.exceptions import HTTPException

from .config import UNTRACED_PATHS, ServiceConfig
from .http import NotReady, build_app
from .json_errors import JsonErrorsMiddleware
from .model_store import policy_dir_from_tag
from .oip import V2RootMiddleware, build_oip_app
from .openapi import OpenAPIMiddleware
from .process import configure_server
from .routes import NoRedirectMiddleware, bound_http_metrics
from .runtime import PolicyRuntime

log = logging.getLogger("lorasa.service")


def _shared_state_dir() -> str:
    """LORASA_STATE_DIR, or a fresh temp dir created by the process that first imports this module
    (the `bentoml serve` parent) and exported so every worker it spawns inherits the same one.
    The creator removes it at exit: with no LORASA_STATE_DIR, uploads last as long as the server."""
    d = os.environ.get("LORASA_STATE_DIR", "")
    if not d:
        d = tempfile.mkdtemp(prefix="lorasa-serve-state-")
        os.environ["LORASA_STATE_DIR"] = d
        atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def _config() -> ServiceConfig:
    """LORASA_* settings; a bad value is one line on stderr and exit 2 (not BentoML's import traceback)."""
    try:
        return replace(ServiceConfig.from_env(), state_dir=_shared_state_dir())
    except ValueError as e:
        sys.stderr.write(f"lorasa-serve: {e}\n")
        sys.stderr.flush()
        os._exit(2)  # BentoML would catch SystemExit while importing the service and print a traceback


_SETUP: ServiceConfig | None = None


def setup() -> ServiceConfig:
    """All this module does to the process, in one place, once: later calls return the first call's
    config. It runs at import (below) because BentoML needs each part before anything of ours is
    constructed (docs/ARCHITECTURE.md, "What the service does at import"):
    - the LORASA_* settings: the `@bentoml.service` decorator reads workers, timeout, access log and
      tracing from them when the class is defined;
    - the shared state dir (`_shared_state_dir`): the `bentoml serve` parent, which never constructs
      LorasaPolicy, creates it and exports LORASA_STATE_DIR so that every worker it spawns inherits it;
    - `configure_server`: the parent's metrics dir and arbiter check delay, before `bentoml serve`
      empties that dir and starts its arbiter (workers skip it);
    - `bound_http_metrics`: every process's traffic metrics labelled by route template, before a worker
      builds its ASGI app (BentoML reads the middleware class then, before it constructs LorasaPolicy)."""
    global _SETUP
    if _SETUP is None:
        cfg = _config()
        configure_server(cfg.metrics_dir, cfg.arbiter_check_s)
        bound_http_metrics()
        _SETUP = cfg
    return _SETUP


CONFIG = setup()  # the one import-time step (see setup); the decorator below needs its config


async def _runtime() -> PolicyRuntime:
    """This worker's runtime. A request that reaches a worker still loading the policy (with several
    workers, /readyz may have been answered by another one) waits for the load, up to the timeout."""
    try:
        svc = bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        raise NotReady("service is starting") from None
    if svc.runtime is None and not svc.loaded.is_set():
        await asyncio.to_thread(svc.loaded.wait, CONFIG.timeout_s / 2)
    if svc.runtime is None:
        raise NotReady(svc.load_error or "policy is still loading")
    if not svc.runtime.ready:  # loaded, but the state backend was never reached
        raise NotReady(f"state backend unavailable: {svc.runtime.state_error}")
    return svc.runtime


app = build_app(CONFIG, _runtime)
oip_app = build_oip_app(CONFIG, _runtime)  # the Open Inference Protocol (KServe v2), services/oip.py


@bentoml.asgi_app(oip_app, path="/v2")
@bentoml.asgi_app(app, path="/v1")
@bentoml.service(name="lorasa_policy", workers=CONFIG.workers,
                 traffic={"timeout": CONFIG.timeout_s},
                 logging={"access": {"enabled": bool(CONFIG.access_log)}},  # LORASA_ACCESS_LOG=1
                 tracing={"excluded_urls": [] if CONFIG.trace_act else list(UNTRACED_PATHS)})
class LorasaPolicy:
    def __init__(self) -> None:
        self.cfg = setup()  # done at import already: the same config
        self.runtime: PolicyRuntime | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()  # set when loading has finished (or failed)
        torch.set_num_threads(self.cfg.torch_threads)
        threading.Thread(target=self._load, name="lorasa-load", daemon=True).start()

    def _load(self) -> None:
        try:
            cfg = self.cfg
            path = policy_dir_from_tag(cfg.model_tag) if cfg.model_tag else Path(cfg.policy)
            self.runtime = PolicyRuntime(cfg, path)
            log.info("lorasa policy %s loaded: agents %s; state: %s", path, self.runtime.spec.agent_ids,
                     self.runtime.state.description)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("lorasa policy failed to load: %s", self.load_error)
        finally:
            self.loaded.set()

    def __is_ready__(self) -> bool:
        """503 with the reason (BentoML answers /readyz with this HTTPException's detail)."""
        if self.runtime is None:
            if self.load_error:
                raise HTTPException(503, f"not ready: {self.load_error}")
            return False
        if not self.runtime.ready:
            raise HTTPException(503, f"not ready: state backend unavailable: {self.runtime.state_error}")
        return True


LorasaPolicy.add_asgi_middleware(JsonErrorsMiddleware)  # JSON errors on BentoML's own paths too
LorasaPolicy.add_asgi_middleware(OpenAPIMiddleware)  # /docs.json also describes /v1 and /v2
LorasaPolicy.add_asgi_middleware(V2RootMiddleware)  # GET /v2: OIP server metadata, no redirect
LorasaPolicy.add_asgi_middleware(NoRedirectMiddleware)  # /v1/act/: a JSON 404, never a Host-built 307
