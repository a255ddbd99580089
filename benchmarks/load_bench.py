"""HTTP load benchmark (loopback only, bounded in requests and seconds).

    python -m benchmarks.load_bench                     # the shipped policy (policies/halfcheetah_2x3)
    python -m benchmarks.load_bench --random-team 12x3,12x3 --clients 8 --requests 150

Starts two real `bentoml serve` processes, then N concurrent clients each step a team of agents
through its own session (one request per team step, keep-alive connections). Three conditions, run
side by side in interleaved rounds (so background load on a shared machine hits all of them):
  batched  the service as shipped (requests batched into one forward by the micro-batcher)
  swap     the same server and load while one agent's adapter is hot-swapped every --swap-interval s
  single   a second server whose batcher may not batch requests (LORASA_MAX_BATCH_ROWS = team size)
  threadsN (with --threads-compare N) a third server like the first but with N torch threads
  stateless, bentoml_batching (with --compare-bentoml-batching) stateless deterministic clients (state
           passed back) against the first server and against the same Engine behind BentoML's
           `@bentoml.api(batchable=True)` (benchmarks/bentoml_batching_probe.py)
Reports requests/s, p50/p99 latency, batch sizes seen (from the responses), errors, version
regressions, and the ratios swap/batched p99 and batched/single throughput; writes JSON and a PNG.

    python -m benchmarks.load_bench --replicas          # scale-out: 2 replicas on Redis vs 1 local server

With --replicas, two conditions in interleaved rounds, both with an adapter hot-swapped every
--swap-interval s: `local_1` (one server, local state dir) and `redis_2` (two `bentoml serve` replicas
with their own state dirs sharing a real redis-server; each client sends its session's steps to the
replicas in turn, as a round-robin load balancer would, so every step's state crosses replicas).
It also reports the per-request cost of the version check: the servers time the once-per-batch
generation read (`lorasa_state_check_seconds` on /metrics); total check time / requests served.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
from tqdm import tqdm

from lorasa_serve import AgentSpec, PolicySpec, init_adapter, init_backbone, save_policy
from lorasa_serve.artifacts import adapter_bytes, load_policy
from lorasa_serve.cli import ArgumentParser, UsageError, run_cli

from services.config import DEFAULT_POLICY
from .servers import ServerProcess
from .timing import percentile


@dataclass
class RunResult:
    name: str
    requests: int = 0
    errors: int = 0
    version_regressions: int = 0
    swaps: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batch_requests: list[int] = field(default_factory=list)  # per response: requests in its forward
    batch_rows: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms)
        br = np.asarray(self.batch_requests, dtype=float)
        has_batches = len(br) > 0
        return {"name": self.name, "requests": self.requests, "errors": self.errors,
                "version_regressions": self.version_regressions, "swaps": self.swaps,
                "seconds": round(self.seconds, 2), "req_per_s": round(self.requests / self.seconds, 1),
                "p50_ms": round(float(percentile(lat, 50)), 2),
                "p99_ms": round(float(percentile(lat, 99)), 2),
                "mean_ms": round(float(lat.mean()), 2), "max_ms": round(float(lat.max()), 2),
                "mean_requests_per_forward": round(float(br.mean()), 2) if has_batches else None,
                "max_requests_per_forward": int(br.max()) if has_batches else None,
                "mean_rows_per_forward": round(float(np.mean(self.batch_rows)), 1) if has_batches else None}


def add_into(total: RunResult, r: RunResult) -> None:
    for f in ("requests", "errors", "version_regressions", "swaps", "seconds"):
        setattr(total, f, getattr(total, f) + getattr(r, f))
    for f in ("latencies_ms", "batch_requests", "batch_rows"):
        getattr(total, f).extend(getattr(r, f))


def random_team_policy(directory: Path, team: str, seed: int = 0) -> Path:
    """A random policy with the given per-agent sizes, e.g. '12x3,12x3' (obs x act)."""
    sizes = [tuple(int(v) for v in part.split("x")) for part in team.split(",")]
    spec = PolicySpec(agents=tuple(AgentSpec(f"agent_{i}", o, a) for i, (o, a) in enumerate(sizes)))
    g = torch.Generator().manual_seed(seed)
    save_policy(directory, spec, init_backbone(spec, g),
                {a: init_adapter(spec, g, b_std=0.1) for a in spec.agent_ids})
    return directory


def client(url: str | list[str], spec: PolicySpec, k: int, n_req: int, deadline: float, swap_agent: str,
           res: RunResult, lock: threading.Lock, bar: tqdm, mode: str = "session") -> None:
    """Step one team: mode "session" (server keeps the state, sampled actions), "stateless" (the
    client passes the state back, deterministic) or "probe" (stateless, BentoML-batching probe)."""
    g = np.random.default_rng(k)
    urls = [url] if isinstance(url, str) else url  # several: a round-robin load balancer per step
    last_version, state = 0, [None] * len(spec.agents)
    path = "/act" if mode == "probe" else "/v1/act"
    with requests.Session() as s:
        for t in range(n_req):
            if time.monotonic() > deadline:
                break
            rows = [{"agent_id": a.agent_id, "obs": g.standard_normal(a.obs_dim).round(4).tolist()}
                    for a in spec.agents]
            if mode == "session":
                body = {"session_id": f"bench-{k}", "rows": rows, "deterministic": False}
            else:
                rows = [{**r, "state": h} if h is not None else r for r, h in zip(rows, state)]
                body = {"rows": rows}
            t0 = time.perf_counter()
            try:
                r = s.post(urls[t % len(urls)] + path, json=body, timeout=30)
                ok, out = r.status_code == 200, (r.json() if r.status_code == 200 else None)
            except requests.RequestException:
                ok, out = False, None
            ms = 1000 * (time.perf_counter() - t0)
            if ok and mode != "session":
                state = [o["state"] for o in out] if mode == "probe" else out["state"]
            with lock:
                res.requests += 1
                if not ok:
                    res.errors += 1
                    continue
                res.latencies_ms.append(ms)
                if mode != "probe":
                    res.batch_requests.append(out["batch"]["requests"])
                    res.batch_rows.append(out["batch"]["rows"])
                    v = out["versions"][spec.agent_ids.index(swap_agent)]
                    res.version_regressions += int(v < last_version)
                    last_version = max(last_version, v)
            bar.update(1)


def bentoml_batch_sizes(url: str) -> float:
    """Mean requests per batch from BentoML's own adaptive-batching histogram on /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith("bentoml_service_adaptive_batch_size" + suffix):
                vals[suffix] = vals.get(suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return vals.get("_sum", 0.0) / max(vals.get("_count", 0.0), 1.0)


def swapper(url: str | list[str], token: str, spec: PolicySpec, agent: str, interval: float,
            stop: threading.Event, res: RunResult) -> None:
    g = torch.Generator().manual_seed(123)
    urls, k = ([url] if isinstance(url, str) else url), 0
    while not stop.wait(interval):
        data = adapter_bytes(spec, agent, init_adapter(spec, g, b_std=0.1))
        k += 1
        r = requests.put(f"{urls[k % len(urls)]}/v1/admin/adapters/{agent}", data=data,
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
        res.swaps += int(r.status_code == 200)
        res.errors += int(r.status_code != 200)


def run_load(srv: ServerProcess | list[ServerProcess], spec: PolicySpec, name: str, args, token: str,
             swap: bool, mode: str = "session") -> RunResult:
    """srv: one server, or replicas that clients (and the swapper) use in turn."""
    urls = [s.url for s in srv] if isinstance(srv, list) else srv.url
    res, lock, stop = RunResult(name), threading.Lock(), threading.Event()
    agent = spec.agent_ids[-1]
    deadline = time.monotonic() + args.seconds
    with tqdm(total=args.clients * args.requests, desc=name, unit="req", leave=False,
              mininterval=1.0) as bar:
        threads = [threading.Thread(target=client, args=(urls, spec, k, args.requests, deadline,
                                                         agent, res, lock, bar, mode))
                   for k in range(args.clients)]
        sw = threading.Thread(target=swapper, args=(urls, token, spec, agent, args.swap_interval,
                                                    stop, res)) if swap else None
        t0 = time.monotonic()
        [t.start() for t in threads]
        if sw:
            sw.start()
        [t.join() for t in threads]
        res.seconds = time.monotonic() - t0
        stop.set()
        if sw:
            sw.join()
    return res


def serve(policy: Path, token: str, workers: int, extra: dict[str, str], log: Path,
          target: str = "") -> ServerProcess:
    env = {"LORASA_POLICY": str(policy), "LORASA_ADMIN_TOKEN": token, "LORASA_WORKERS": str(workers),
           "LORASA_STATE_DIR": tempfile.mkdtemp(prefix="lorasa-bench-state-"), **extra}
    return ServerProcess(env, log, target=target)


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        lat = np.sort(r.latencies_ms)
        ax1.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r.name)
        if r.batch_requests:  # (BentoML's batching reports only a mean, on /metrics)
            ax2.hist(r.batch_requests, bins=np.arange(0.5, max(r.batch_requests) + 1.5), alpha=0.5,
                     label=r.name)
    ax1.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests", title="latency CDF")
    ax2.set(xlabel="requests batched into the forward that served a request", ylabel="responses",
            title="batch sizes seen")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PROG = "python -m benchmarks.load_bench"


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=DEFAULT_POLICY, help="the policy directory to serve")
    ap.add_argument("--random-team", default="", help="bench a random policy instead, e.g. 12x3,12x3")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    ap.add_argument("--requests", type=int, default=1000, help="per client, condition and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the conditions")
    ap.add_argument("--seconds", type=float, default=30.0, help="wall-time cap per run")
    ap.add_argument("--swap-interval", type=float, default=1.0, help="seconds between adapter hot swaps (swap runs)")
    ap.add_argument("--workers", type=int, default=1, help="BentoML worker processes per server")
    ap.add_argument("--threads-compare", type=int, default=0,
                    help="also run a server with this many torch threads per worker (default 1)")
    ap.add_argument("--compare-bentoml-batching", action="store_true",
                    help="also run stateless clients against the service and against BentoML's own "
                         "adaptive batching (benchmarks/bentoml_batching_probe.py)")
    ap.add_argument("--replicas", action="store_true",
                    help="scale-out mode: 2 replicas sharing Redis vs 1 server on the local backend")
    ap.add_argument("--out", default="runs/load_bench", help="folder for load_bench.json/.png and server logs")
    return ap


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    policy = Path(args.policy)
    if not args.random_team and not (policy / "policy.json").is_file():
        raise UsageError(f"{policy} is not a policy directory; pass --policy or --random-team 12x3,12x3")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.random_team:
        policy = random_team_policy(out / "random_policy", args.random_team)
    spec = load_policy(policy)[0]
    token = secrets.token_hex(16)
    if args.replicas:
        replicas_main(args, policy, spec, token, out)
        return 0
    servers = {"shipped": serve(policy, token, args.workers, {}, out / "server_shipped.log"),
               "single": serve(policy, token, args.workers,
                               {"LORASA_MAX_BATCH_ROWS": str(len(spec.agents)),
                                "LORASA_MAX_ROWS_PER_REQUEST": str(len(spec.agents))},
                               out / "server_single.log")}
    conditions = [("batched", "shipped", False, "session"), ("swap", "shipped", True, "session"),
                  ("single", "single", False, "session")]
    if args.threads_compare:
        name = f"threads{args.threads_compare}"
        servers[name] = serve(policy, token, args.workers,
                              {"LORASA_TORCH_THREADS": str(args.threads_compare)}, out / f"server_{name}.log")
        conditions.append((name, name, False, "session"))
    if args.compare_bentoml_batching:
        servers["probe"] = serve(policy, token, 1, {}, out / "server_probe.log",
                                 target="benchmarks.bentoml_batching_probe:BatchableProbe")
        conditions += [("stateless", "shipped", False, "stateless"),
                       ("bentoml_batching", "probe", False, "probe")]
    totals = {name: RunResult(name) for name, *_ in conditions}
    try:
        for srv in servers.values():
            srv.__enter__()
            mode = "probe" if srv is servers.get("probe") else "session"
            run_load(srv, spec, "warmup", argparse.Namespace(**{**vars(args), "requests": 10}), token,
                     False, mode)
        for rnd in range(args.rounds):
            for name, server, swap, mode in conditions:
                r = run_load(servers[server], spec, f"{name} {rnd + 1}/{args.rounds}", args, token, swap,
                             mode)
                add_into(totals[name], r)
                print(json.dumps({"round": rnd + 1, **r.summary()}), flush=True)
        probe_batch = bentoml_batch_sizes(servers["probe"].url) if "probe" in servers else None
    finally:
        for srv in servers.values():
            srv.stop()
    results = list(totals.values())
    base, sw, single, *extra = (r.summary() for r in results)
    ratios = {"p99_swap_over_batched": round(sw["p99_ms"] / base["p99_ms"], 2),
              "p50_swap_over_batched": round(sw["p50_ms"] / base["p50_ms"], 2),
              "throughput_batched_over_single": round(base["req_per_s"] / single["req_per_s"], 2),
              "p99_single_over_batched": round(single["p99_ms"] / base["p99_ms"], 2)}
    by_name = {r["name"]: r for r in extra}
    if probe_batch is not None:
        by_name["bentoml_batching"]["mean_requests_per_forward"] = round(probe_batch, 2)
        st, bb = by_name.pop("stateless"), by_name.pop("bentoml_batching")
        ratios["throughput_stateless_over_bentoml_batching"] = round(st["req_per_s"] / bb["req_per_s"], 2)
        ratios["p99_bentoml_batching_over_stateless"] = round(bb["p99_ms"] / st["p99_ms"], 2)
    for r in by_name.values():
        ratios[f"p99_{r['name']}_over_batched"] = round(r["p99_ms"] / base["p99_ms"], 2)
        ratios[f"throughput_batched_over_{r['name']}"] = round(base["req_per_s"] / r["req_per_s"], 2)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "policy": str(policy),
              "agents": len(spec.agents), "clients": args.clients, "workers": args.workers,
              "rounds": args.rounds, "runs": [base, sw, single, *extra], "ratios": ratios, "command": " ".join(sys.argv)}
    (out / "load_bench.json").write_text(json.dumps(report, indent=1))
    plot(results, out / "load_bench.png")
    for r in (base, sw, single, *extra):
        print(json.dumps(r))
    print(json.dumps(ratios))
    print(f"wrote {out / 'load_bench.json'} and {out / 'load_bench.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, argv)


def check_cost(servers: list[ServerProcess]) -> tuple[float, float]:
    """(seconds, count) of the per-batch version check, summed over the servers' /metrics."""
    total = {"_sum": 0.0, "_count": 0.0}
    for srv in servers:
        for line in requests.get(srv.url + "/metrics", timeout=10).text.splitlines():
            for suffix in total:
                if line.startswith("lorasa_state_check_seconds" + suffix):
                    total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"], total["_count"]


def replicas_main(args, policy: Path, spec: PolicySpec, token: str, out: Path) -> None:
    """2 replicas on Redis vs 1 server on the local backend, both with a hot swap every interval."""
    from .servers import RedisServer
    redis_srv = RedisServer(out / "redis").start()
    env = {"LORASA_REDIS_URL": redis_srv.url}
    servers = {"local_1": [serve(policy, token, args.workers, {}, out / "server_local.log")],
               "redis_2": [serve(policy, token, args.workers, env, out / f"server_redis_{k}.log") for k in "ab"]}
    totals = {name: RunResult(name) for name in servers}
    checks = {}
    try:
        for name, group in servers.items():
            for srv in group:
                srv.__enter__()
            run_load(group, spec, "warmup", argparse.Namespace(**{**vars(args), "requests": 10}), token, False)
            checks[name] = check_cost(group)
        for rnd in range(args.rounds):
            for name, group in servers.items():
                r = run_load(group, spec, f"{name} {rnd + 1}/{args.rounds}", args, token, True)
                add_into(totals[name], r)
                print(json.dumps({"round": rnd + 1, **r.summary()}), flush=True)
        for name, group in servers.items():
            s0, n0 = checks[name]
            s1, n1 = check_cost(group)
            checks[name] = (s1 - s0, n1 - n0)
    finally:
        for group in servers.values():
            for srv in group:
                srv.stop()
        redis_srv.stop()
    runs = []
    for name, res in totals.items():
        row = res.summary()
        secs, n = checks[name]
        row["version_check_us_per_batch"] = round(1e6 * secs / max(n, 1), 1)
        row["version_check_us_per_request"] = round(1e6 * secs / max(res.requests, 1), 1)
        runs.append(row)
    local, rep2 = runs
    ratios = {"throughput_redis_2_over_local_1": round(rep2["req_per_s"] / local["req_per_s"], 2),
              "p50_redis_2_over_local_1": round(rep2["p50_ms"] / local["p50_ms"], 2),
              "p99_redis_2_over_local_1": round(rep2["p99_ms"] / local["p99_ms"], 2)}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "policy": str(policy),
              "agents": len(spec.agents), "clients": args.clients, "workers_per_server": args.workers,
              "rounds": args.rounds, "swap_interval_s": args.swap_interval, "runs": runs, "ratios": ratios,
              "command": " ".join(sys.argv)}
    (out / "load_bench_replicas.json").write_text(json.dumps(report, indent=1))
    cols = ["name", "req_per_s", "p50_ms", "p99_ms", "errors", "version_regressions", "swaps",
            "version_check_us_per_batch", "version_check_us_per_request"]
    print("\n" + " | ".join(cols))
    for r in runs:
        print(" | ".join(str(r[c]) for c in cols))
    print(json.dumps(ratios))
    print(f"wrote {out / 'load_bench_replicas.json'}")


if __name__ == "__main__":
    sys.exit(main())
