"""Our server against the peer a user would pick instead: MLServer over the same Engine (loopback).

    make peers-venv                                  # once: MLServer 1.7 in its own venv, .venv/peers
    python -m benchmarks.peers                       # rows 2,64,512,1024; 1 and 8 clients; 400 requests
    python -m benchmarks.peers --rows 2,64 --clients 1 --requests 40   # a quick check

MLServer lives in a venv of its own because its pins would downgrade starlette and OpenTelemetry under
BentoML in ours: each server runs with exactly the packages it ships with. It serves the shipped policy
through `benchmarks/mlserver_runtime.py` (a custom runtime calling `Engine.act`, in its own process:
`parallel_workers` 0); ours is `bentoml serve` with 1 worker. Both run 1 torch thread.

Every cell (rows per request x clients) times the same stateless, deterministic OIP request
(agent_index INT64, obs FP32, state FP32). Targets are interleaved in blocks of --block requests per
client, all clients on the same target at once (they meet at a barrier before each block) and the
block order rotating, so a change in machine load hits all alike and no target is timed while the
others load a server:
  ours_json       POST /v2/models/lorasa_policy/infer on `bentoml serve`, JSON tensors
  mlserver_json   the same request on MLServer
  ours_binary     ours with binary tensors (the binary tensor data extension)
  ours_v1         POST /v1/act on ours, the same rows as /v1 JSON rows (no MLServer equivalent)
  ours_live       GET /v2/health/live on ours with the same client (our Starlette app, no inference)
  ours_livez      GET /livez on ours with the same client: BentoML's own route, the per-request floor
Clients are processes (tritonclient.http, one kept-alive connection per target each), so client work
shares no GIL. Prints p50/p90 per cell and the ratios ours/MLServer (< 1: ours is faster); writes JSON
and a PNG to --out. Never run it while anything else uses the CPUs.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.timing import percentile
from lorasa_serve.cli import ArgumentParser, UsageError, run_cli

REPO = Path(__file__).resolve().parent.parent
MODEL = "lorasa_policy"
JSON_HEADERS = {"Content-Type": "application/json"}
TARGETS = ("ours_json", "mlserver_json", "ours_binary", "ours_v1", "ours_live", "ours_livez")


@dataclass
class PeerConfig:
    policy: Path = REPO / "policies" / "halfcheetah_2x3"  # the policy both servers serve
    rows: tuple[int, ...] = (2, 64, 512, 1024)  # rows per request
    clients: tuple[int, ...] = (1, 8)  # concurrent client processes
    requests: int = 400  # requests per target and cell, all clients together
    warmup: int = 10  # untimed requests per target and client before each cell
    block: int = 10  # requests per client in a row on one target (all clients on the same target)
    mlserver: Path = REPO / ".venv" / "peers" / "bin" / "mlserver"  # `make peers-venv` installs it
    out: Path = REPO / "reports" / "service"
    meta: dict = field(default_factory=dict)


# --- servers --------------------------------------------------------------------------------------
def start_mlserver(cfg: PeerConfig, workdir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from benchmarks.servers import free_port
    port, grpc, metrics = free_port(), free_port(), free_port()
    (workdir / "settings.json").write_text(json.dumps(
        {"http_port": port, "grpc_port": grpc, "metrics_port": metrics, "parallel_workers": 0,
         "debug": False, "host": "127.0.0.1"}))
    model = workdir / MODEL
    model.mkdir()
    (model / "model-settings.json").write_text(json.dumps(
        {"name": MODEL, "implementation": "benchmarks.mlserver_runtime.LorasaRuntime",
         "parameters": {"uri": str(cfg.policy), "extra": {"torch_threads": 1}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(cfg.mlserver), "start", str(workdir)], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{port}"
    _wait(proc, url, log)
    return proc, url


def _wait(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120.0) -> None:
    import tritonclient.http as th
    client, t0 = th.InferenceServerClient(url), time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"mlserver exited with {proc.returncode}; log: {log}")
        try:
            if client.is_model_ready(MODEL):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"mlserver not ready after {timeout_s} s; log: {log}")


def _stop(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


# --- clients --------------------------------------------------------------------------------------
def _arrays(spec_d: dict, rows: int, seed: int) -> dict[str, np.ndarray]:
    """agent_index [R], obs [R, obs_max] (zero past each agent's obs_dim), state [R, hidden]."""
    g = np.random.default_rng(seed)
    agents = spec_d["agents"]
    k = g.integers(0, len(agents), rows).astype(np.int64)
    obs_max = max(a["obs_dim"] for a in agents)
    dims = np.array([agents[i]["obs_dim"] for i in k])
    arrays = {"agent_index": k, "obs": (g.standard_normal((rows, obs_max)) * (np.arange(obs_max) < dims[:, None])
                                        ).astype(np.float32)}
    if spec_d["recurrent"]:
        arrays["state"] = g.standard_normal((rows, spec_d["hidden"])).astype(np.float32)
    return arrays


def _inputs(arrays: dict[str, np.ndarray], binary: bool) -> list:
    import tritonclient.http as th
    out = []
    for name, a in arrays.items():
        t = th.InferInput(name, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(a, binary_data=binary)
        out.append(t)
    return out


def client_loop(urls: dict[str, str], spec_d: dict, rows: int, n: int, warmup: int, seed: int,
                block: int, barrier) -> dict[str, list[float]]:
    """One client process: `n` requests per target, in blocks of `block` -> seconds per request.

    Before each block every client waits at `barrier`, so all clients load the same target at once
    (with several clients, interleaving target by target within each client would load our server
    with the other targets' requests while one client times MLServer). The block order rotates."""
    import tritonclient.http as th
    clients = {t: th.InferenceServerClient(urls[t], connection_timeout=120, network_timeout=120) for t in TARGETS}
    arrays = _arrays(spec_d, rows, seed)
    json_in, bin_in, v1 = _inputs(arrays, False), _inputs(arrays, True), _v1_body(spec_d, arrays)
    outs = [th.InferRequestedOutput(o, binary_data=False) for o in ("action", "log_prob")]
    bin_outs = [th.InferRequestedOutput(o, binary_data=True) for o in ("action", "log_prob")]
    calls = {"ours_json": lambda: clients["ours_json"].infer(MODEL, json_in, outputs=outs),
             "mlserver_json": lambda: clients["mlserver_json"].infer(MODEL, json_in, outputs=outs),
             "ours_binary": lambda: clients["ours_binary"].infer(MODEL, bin_in, outputs=bin_outs),
             "ours_v1": lambda: _ok(clients["ours_v1"]._post("v1/act", v1, JSON_HEADERS, None)),
             "ours_live": lambda: clients["ours_live"].is_server_live(),
             "ours_livez": lambda: _ok(clients["ours_livez"]._get("livez", None, None))}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {t: [] for t in TARGETS}
    for b in range(-(-n // block)):
        k = b % len(TARGETS)
        for t in TARGETS[k:] + TARGETS[:k]:
            barrier.wait()
            for _ in range(min(block, n - b * block)):
                t0 = time.perf_counter()
                calls[t]()
                times[t].append(time.perf_counter() - t0)
    return times


def _v1_body(spec_d: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The same rows as a /v1/act body: each row its agent's own obs_dim numbers, its state."""
    agents = spec_d["agents"]
    rows = []
    for i, k in enumerate(arrays["agent_index"].tolist()):
        row = {"agent_id": agents[k]["agent_id"], "obs": arrays["obs"][i, :agents[k]["obs_dim"]].tolist()}
        if "state" in arrays:
            row["state"] = arrays["state"][i].tolist()
        rows.append(row)
    return json.dumps({"rows": rows, "deterministic": True}).encode()


def _ok(response) -> None:
    """tritonclient's raw GET / POST (its way to reach a path outside /v2) must have answered 200."""
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.read()[:200]!r}")


def run_cell(pool, manager, urls: dict, spec_d: dict, rows: int, clients: int, cfg: PeerConfig) -> dict:
    n = max(1, cfg.requests // clients)
    barrier = manager.Barrier(clients)
    jobs = [pool.apply_async(client_loop, (urls, spec_d, rows, n, cfg.warmup, 17 + c, cfg.block, barrier))
            for c in range(clients)]
    times: dict[str, list[float]] = {t: [] for t in TARGETS}
    for j in jobs:
        for t, v in j.get(timeout=3600).items():
            times[t] += v
    cell = {"rows": rows, "clients": clients, "requests": n * clients}
    for t, v in times.items():
        ms = np.asarray(v) * 1e3
        cell[t] = {"p50_ms": float(percentile(ms, 50)), "p90_ms": float(percentile(ms, 90))}
    cell["json_ratio"] = cell["ours_json"]["p50_ms"] / cell["mlserver_json"]["p50_ms"]
    cell["binary_ratio"] = cell["ours_binary"]["p50_ms"] / cell["mlserver_json"]["p50_ms"]
    cell["v1_over_livez"] = cell["ours_v1"]["p50_ms"] / cell["ours_livez"]["p50_ms"]
    cell["json_over_livez"] = cell["ours_json"]["p50_ms"] / cell["ours_livez"]["p50_ms"]
    cell["binary_over_livez"] = cell["ours_binary"]["p50_ms"] / cell["ours_livez"]["p50_ms"]
    return cell


# --- report ---------------------------------------------------------------------------------------
def table(cells: list[dict]) -> str:
    head = ("| rows | clients | ours JSON p50 ms | MLServer JSON p50 ms | ours binary p50 ms | ours /livez p50 ms "
            "| ours /v1 p50 ms | JSON ours/MLServer | binary ours / MLServer JSON | ours JSON / livez "
            "| ours binary / livez | ours /v1 / livez |")
    lines = [head, "|" + "---|" * 12]
    for c in cells:
        lines.append(f"| {c['rows']} | {c['clients']} | {c['ours_json']['p50_ms']:.2f} | "
                     f"{c['mlserver_json']['p50_ms']:.2f} | {c['ours_binary']['p50_ms']:.2f} | "
                     f"{c['ours_livez']['p50_ms']:.2f} | {c['ours_v1']['p50_ms']:.2f} | {c['json_ratio']:.2f} | "
                     f"{c['binary_ratio']:.2f} | {c['json_over_livez']:.2f} | {c['binary_over_livez']:.2f} | "
                     f"{c['v1_over_livez']:.2f} |")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    clients = sorted({c["clients"] for c in cells})
    fig, axes = plt.subplots(1, len(clients), figsize=(5.5 * len(clients), 4), squeeze=False)
    for ax, k in zip(axes[0], clients):
        cs = [c for c in cells if c["clients"] == k]
        rows = [c["rows"] for c in cs]
        for t, style in (("ours_json", "o-"), ("mlserver_json", "s--"), ("ours_binary", "^-"), ("ours_v1", "d-"),
                         ("ours_livez", ":")):
            ax.plot(rows, [c[t]["p50_ms"] for c in cs], style, label=t)
        ax.set(xscale="log", yscale="log", xlabel="rows per request", ylabel="p50 latency (ms)",
               title=f"{k} client{'s' if k > 1 else ''}: /v2 infer, ours vs MLServer (same Engine)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: PeerConfig) -> list[dict]:
    from lorasa_serve.spec import PolicySpec
    from benchmarks.servers import ServerProcess
    spec_d = PolicySpec.load(cfg.policy / "policy.json").to_dict()
    cfg.out.mkdir(parents=True, exist_ok=True)
    env = {"LORASA_POLICY": str(cfg.policy), "LORASA_WORKERS": "1", "LORASA_TORCH_THREADS": "1",
           "LORASA_MAX_ROWS_PER_REQUEST": str(max(1024, max(cfg.rows)))}
    cells = []
    with tempfile.TemporaryDirectory() as d, ServerProcess(env, Path(d) / "bentoml.log") as ours:
        ml, ml_url = start_mlserver(cfg, Path(d), Path(d) / "mlserver.log")
        try:
            ours_url = ours.url.removeprefix("http://")
            urls = {t: ml_url if t.startswith("mlserver") else ours_url for t in TARGETS}
            ctx = mp.get_context("spawn")
            with ctx.Pool(max(cfg.clients)) as pool, ctx.Manager() as manager:
                for k in cfg.clients:
                    for r in cfg.rows:
                        cells.append(run_cell(pool, manager, urls, spec_d, r, k, cfg))
                        print(f"rows {r:5d} clients {k}: JSON ours/MLServer {cells[-1]['json_ratio']:.2f}, "
                              f"ours JSON / livez {cells[-1]['json_over_livez']:.2f}", flush=True)
        finally:
            _stop(ml)
    return cells


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0])
    d = PeerConfig()
    csv = lambda t: ",".join(map(str, t))  # noqa: E731
    p.add_argument("--rows", type=_ints, default=d.rows,
                   help=f"rows per request, comma-separated (default: {csv(d.rows)})")
    p.add_argument("--clients", type=_ints, default=d.clients,
                   help=f"client processes, comma-separated (default: {csv(d.clients)})")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per target and cell")
    p.add_argument("--block", type=int, default=d.block, help="requests per client in a row on one target")
    p.add_argument("--policy", type=Path, default=d.policy, help="policy directory (default: the shipped one)")
    p.add_argument("--mlserver", type=Path, default=d.mlserver, help="the mlserver executable (make peers-venv)")
    p.add_argument("--out", type=Path, default=d.out, help="folder for peers.json and peers.png")
    return p


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: list[str] | None) -> PeerConfig:
    p = parser()
    a = p.parse_args(argv)
    if a.requests < 1 or a.block < 1 or min(a.rows) < 1 or min(a.clients) < 1:
        p.error("--rows, --clients, --requests and --block must be positive")
    return PeerConfig(policy=a.policy, rows=a.rows, clients=a.clients, requests=a.requests, block=a.block,
                      mlserver=a.mlserver, out=a.out)


def run_peers(argv: list[str] | None) -> int:
    cfg = parse_args(argv)
    if not cfg.mlserver.exists():
        raise UsageError(f"{cfg.mlserver} not found: run `make peers-venv` first (MLServer in its own venv)")
    if not (cfg.policy / "policy.json").is_file():
        raise UsageError(f"--policy {cfg.policy}: no policy.json there")
    cells = run(cfg)
    print(table(cells))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "policy": str(cfg.policy.relative_to(REPO) if cfg.policy.is_relative_to(REPO) else cfg.policy)}
    (cfg.out / "peers.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    plot(cells, cfg.out / "peers.png")
    print(f"wrote {cfg.out / 'peers.json'} and {cfg.out / 'peers.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m benchmarks.peers", run_peers, argv)


if __name__ == "__main__":
    sys.exit(main())
