"""Protocol benchmark: in-process Engine.act vs /v1 JSON vs /v2 JSON vs /v2 binary (loopback only).

    python -m benchmarks.protocol_bench                       # the full grid (the BENCHMARKS.md numbers)
    python -m benchmarks.protocol_bench --rows 2,64 --clients 1 --seconds 0.5 --policies shipped  # check

For each policy (the shipped one, and a random SMAX-3s5z-sized one: 8 agents, obs 205, 13 actions,
categorical, made in a temp dir) it starts one real `bentoml serve` (1 worker), then for every rows per
request (2, 64, 512, 4096) and number of clients (1, 8) measures, side by side in interleaved rounds:
  inproc      Engine.act on the same rows in this process (1 torch thread, like a server worker)
  v1_json     POST /v1/act, JSON rows (state passed back per row)
  v2_json     POST /v2/models/lorasa_policy/infer, JSON tensors
  v2_binary   the same with binary tensors (lorasa_serve.client: encode, send, decode)
and GET /livez latency. Clients are separate processes (one keep-alive connection each), so client
work does not share a GIL. Every request is stateless and deterministic: agent ids, obs, state,
reset (and avail for the categorical policy). Prints rows/s and p50/p99 per cell and the goal
ratios (2-row p50 / livez p50 <= 1.5; v2 binary rows/s over in-process at 512 rows >= 1/3, at 4096
>= 1/2); `--pieces` also times the server's per-request steps in-process (parse, validate, encode)
to show where the time goes. Writes JSON and a PNG to --out.
"""
from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import percentile
from lorasa_serve.cli import ArgumentParser, run_cli
from services.config import DEFAULT_POLICY

PROTOCOLS = ("v1_json", "v2_json", "v2_binary")
MIN_REQUESTS = 3  # per client and cell, however long they take
SMAX_3S5Z = {"agents": 8, "obs": 205, "act": 13}


# --- request payloads (built in the client processes too: numpy + stdlib + lorasa_serve.client) ----
def payload(spec_d: dict, rows: int, seed: int = 0) -> dict:
    """Random stateless rows: ids [R], obs [R, obs_max] zero past each obs_dim, state, reset, avail."""
    g = np.random.default_rng(seed)
    agents = spec_d["agents"]
    k = g.integers(0, len(agents), rows)
    dims = np.array([agents[i]["obs_dim"] for i in k])
    obs_max = max(a["obs_dim"] for a in agents)
    act_max = max(a["act_dim"] for a in agents)
    p = {"ids": [agents[i]["agent_id"] for i in k], "index": k.astype(np.int64),
         "obs": (g.standard_normal((rows, obs_max)) * (np.arange(obs_max) < dims[:, None])
                 ).astype(np.float32),
         "state": (g.standard_normal((rows, spec_d["hidden"])).astype(np.float32)
                   if spec_d["recurrent"] else None),
         "reset": np.zeros(rows, bool), "avail": None}
    if spec_d["action"] == "categorical":
        adims = np.array([agents[i]["act_dim"] for i in k])
        p["avail"] = np.arange(act_max) < adims[:, None]
    return p


def _v1_body(spec_d: dict, p: dict) -> bytes:
    dims = {a["agent_id"]: (a["obs_dim"], a["act_dim"]) for a in spec_d["agents"]}
    rows = []
    for i, a in enumerate(p["ids"]):
        row = {"agent_id": a, "obs": p["obs"][i, :dims[a][0]].tolist(), "reset": bool(p["reset"][i])}
        if p["state"] is not None:
            row["state"] = p["state"][i].tolist()
        if p["avail"] is not None:
            row["avail_actions"] = p["avail"][i, :dims[a][1]].astype(int).tolist()
        rows.append(row)
    return json.dumps({"rows": rows, "deterministic": True}).encode()


def _v2_tensors(p: dict, binary: bool) -> list:
    t = [("agent_index", "INT64", p["index"], binary), ("obs", "FP32", p["obs"], binary),
         ("reset", "BOOL", p["reset"], binary)]
    if p["state"] is not None:
        t.append(("state", "FP32", p["state"], binary))
    if p["avail"] is not None:
        t.append(("avail", "BOOL", p["avail"], binary))
    return t


def client_loop(url: str, protocol: str, spec_d: dict, rows: int, seed: int, start: float, stop: float
                ) -> dict:
    """One client process: requests back to back from `start` to `stop` (wall clock); -> latencies."""
    from lorasa_serve.client import HTTPConnection, PolicyClient, _peer_closed  # TCP_NODELAY, like the client
    from lorasa_serve.oip_codec import decode_body, encode
    p = payload(spec_d, rows, seed)
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=60)
    client = PolicyClient(url, timeout=60)

    def post(path: str, body: bytes, headers: dict) -> http.client.HTTPResponse:
        # the server closes a connection idle for 5 s (uvicorn's keep-alive timeout): building a 23 MB
        # JSON body with 8 clients on 2 cores can take that long, so reconnect first, as PolicyClient does
        if _peer_closed(conn.sock):
            conn.close()
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{protocol}: HTTP {r.status}: {data[:300]!r}")
        return r, data

    def one() -> None:
        if protocol == "v1_json":
            _, data = post("/v1/act", _v1_body(spec_d, p), {"Content-Type": "application/json"})
            out = json.loads(data)
            np.asarray(out["log_probs"], np.float32)
            if "state" in out:
                np.asarray(out["state"], np.float32)
        elif protocol == "v2_json":
            body, _ = encode({}, "inputs", _v2_tensors(p, False))
            _, data = post("/v2/models/lorasa_policy/infer", body, {"Content-Type": "application/json"})
            decode_body(data, None, "outputs")
        elif protocol == "v2_binary":
            client.act(p["index"], p["obs"], p["state"], p["reset"], p["avail"])
        elif protocol == "livez":
            conn.request("GET", "/livez")
            conn.getresponse().read()
        else:
            raise ValueError(protocol)

    one()  # connect and warm up before the clock starts
    lat = []
    while time.time() < start:
        time.sleep(0.001)
    begin = time.time()
    while time.time() < stop or len(lat) < MIN_REQUESTS:  # slow cells (v1 JSON, 4096 rows) too
        t0 = time.perf_counter()
        one()
        lat.append(time.perf_counter() - t0)
    end = time.time()
    conn.close()
    client.close()
    return {"latencies": lat, "seconds": end - begin}


def run_clients(pool, url: str, protocol: str, spec_d: dict, rows: int, clients: int, seconds: float) -> dict:
    start = time.time() + 0.3 + 0.05 * clients
    jobs = [pool.apply_async(client_loop, (url, protocol, spec_d, rows, 100 + k, start, start + seconds))
            for k in range(clients)]
    try:
        outs = [j.get(timeout=seconds + 120) for j in jobs]
    except Exception as e:  # a failed cell is reported as such; the other cells still run
        return {"requests": 0, "rows_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"),
                "error": f"{type(e).__name__}: {str(e)[:200]}"}
    lat = np.concatenate([o["latencies"] for o in outs]) * 1e3
    elapsed = max(o["seconds"] for o in outs)
    return {"requests": int(len(lat)), "rows_per_s": len(lat) * rows / elapsed,
            "p50_ms": float(percentile(lat, 50)), "p99_ms": float(percentile(lat, 99))}


def run_inproc(engine, spec_d: dict, rows: int, seconds: float) -> dict:
    import torch
    p = payload(spec_d, rows)
    t = {k: None if p[k] is None else torch.from_numpy(p[k]) for k in ("obs", "state", "reset", "avail")}
    ids = p["index"]
    call = lambda: engine.act(ids, t["obs"], t["state"], t["reset"], t["avail"])  # noqa: E731
    call()
    lat, t_end = [], time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end or len(lat) < MIN_REQUESTS:
        s = time.perf_counter()
        call()
        lat.append(time.perf_counter() - s)
    elapsed = time.perf_counter() - t0
    lat = np.asarray(lat) * 1e3
    return {"requests": len(lat), "rows_per_s": len(lat) * rows / elapsed,
            "p50_ms": float(percentile(lat, 50)), "p99_ms": float(percentile(lat, 99))}


def time_pieces(spec, spec_d: dict, rows: int, repeat: int) -> dict:
    """Per-request server steps in-process (ms, best of `repeat`): where a request's time goes."""
    from lorasa_serve.oip_codec import encode
    from services.oip import InferCall, encode_result, parse_infer
    from lorasa_serve import strict_json
    from lorasa_serve.protocol import ActResult, AgentTable
    from services.schema import act_response, parse_act, parse_json
    p = payload(spec_d, rows)
    v1 = _v1_body(spec_d, p)
    v2j, _ = encode({}, "inputs", _v2_tensors(p, False))
    v2b, hl = encode({"parameters": {"binary_data_output": True}}, "inputs", _v2_tensors(p, True))
    n = rows
    actions = np.zeros((n, spec.act_max), np.float32) if spec.action == "gaussian" else np.zeros(n, np.int64)
    state = np.zeros((n, spec.hidden), np.float32) if spec.recurrent else None
    res = ActResult(actions, np.zeros(n, np.float32), state, np.ones(n, np.int64), {"requests": 1, "rows": n})
    big = 1 << 20

    def best(fn) -> float:
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(min(ts) * 1e3, 3)

    req1 = parse_act(parse_json(v1), spec, big)
    table = AgentTable(spec)
    call_j = parse_infer(v2j, None, spec, big)
    call_b = parse_infer(v2b, str(hl), spec, big)
    return {"rows": rows,
            "v1_parse_ms": best(lambda: parse_act(parse_json(v1), spec, big)),
            "v1_encode_ms": best(lambda: strict_json.dumps(act_response(req1, table, res.actions, res.log_probs,
                                                                 res.state, res.versions, res.batch))),
            "v2_json_parse_ms": best(lambda: parse_infer(v2j, None, spec, big)),
            "v2_json_encode_ms": best(lambda: encode_result(InferCall(call_j.req, [(o, False) for o, _ in
                                                                                   call_j.outputs], None),
                                                            spec, res)),
            "v2_binary_parse_ms": best(lambda: parse_infer(v2b, str(hl), spec, big)),
            "v2_binary_encode_ms": best(lambda: encode_result(call_b, spec, res)),
            "bytes": {"v1": len(v1), "v2_json": len(v2j), "v2_binary": len(v2b)}}


def smax_policy(directory: Path) -> Path:
    import torch
    from lorasa_serve import AgentSpec, PolicySpec, init_adapter, init_backbone, save_policy
    spec = PolicySpec(agents=tuple(AgentSpec(f"agent_{i}", SMAX_3S5Z["obs"], SMAX_3S5Z["act"])
                                   for i in range(SMAX_3S5Z["agents"])), action="categorical")
    g = torch.Generator().manual_seed(0)
    save_policy(directory, spec, init_backbone(spec, g), {a: init_adapter(spec, g, b_std=0.1)
                                                          for a in spec.agent_ids})
    return directory


def table(results: list[dict]) -> str:
    head = "".join(f"{c:>30}" for c in ("inproc", *PROTOCOLS))
    lines = [f"{'policy':<10}{'rows':>6}{'clients':>8}  " + head,
             " " * 26 + "rows/s  p50 ms  p99 ms      " * 4]
    for r in results:
        cells = "".join(f"{c['rows_per_s']:>12.0f}{c['p50_ms']:>8.2f}{c['p99_ms']:>8.2f}  "
                        for c in (r["inproc"], *(r[p] for p in PROTOCOLS)))
        lines.append(f"{r['policy']:<10}{r['rows']:>6}{r['clients']:>8}  {cells}")
    return "\n".join(lines)


def goals(results: list[dict], livez: dict) -> dict:
    out = {}
    for pol, lz in livez.items():
        cell = {(r["rows"], r["clients"]): r for r in results if r["policy"] == pol}
        g: dict = {"livez_p50_ms": round(lz["p50_ms"], 3)}
        if (2, 1) in cell:
            for proto in PROTOCOLS:
                g[f"{proto}_2rows_p50_over_livez"] = round(cell[(2, 1)][proto]["p50_ms"] / lz["p50_ms"], 2)
            g["goal_2rows_within_1.5x_livez"] = g["v2_binary_2rows_p50_over_livez"] <= 1.5
        for rows, need in ((512, 1 / 3), (4096, 1 / 2)):
            if (rows, 1) in cell:
                ratio = cell[(rows, 1)]["v2_binary"]["rows_per_s"] / cell[(rows, 1)]["inproc"]["rows_per_s"]
                g[f"v2_binary_over_inproc_{rows}rows"] = round(ratio, 3)
                g[f"goal_{rows}rows_at_least_{need:.2f}"] = ratio >= need
        out[pol] = g
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pols = sorted({r["policy"] for r in results})
    clients = sorted({r["clients"] for r in results})
    fig, axes = plt.subplots(len(pols), len(clients), figsize=(5 * len(clients), 3.6 * len(pols)),
                             squeeze=False)
    for i, pol in enumerate(pols):
        for j, c in enumerate(clients):
            rs = sorted((r for r in results if r["policy"] == pol and r["clients"] == c),
                        key=lambda r: r["rows"])
            for name in ("inproc", *PROTOCOLS):  # failed cells (nan) leave a gap
                axes[i][j].plot([r["rows"] for r in rs], [r[name]["rows_per_s"] for r in rs], "o-",
                                label=name)
            axes[i][j].set(xscale="log", yscale="log", xlabel="rows per request", ylabel="rows/s",
                           title=f"{pol}, {c} client{'s' * (c > 1)}")
            axes[i][j].set_xticks([r["rows"] for r in rs], [str(r["rows"]) for r in rs])
            axes[i][j].minorticks_off()
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PROG = "python -m benchmarks.protocol_bench"


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="shipped,smax3s5z", help="comma list of shipped, smax3s5z")
    ap.add_argument("--rows", default="2,64,512,4096", help="comma list of rows per request")
    ap.add_argument("--clients", default="1,8", help="comma list of concurrent client processes")
    ap.add_argument("--seconds", type=float, default=3.0, help="per cell, protocol and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (background load hits all)")
    ap.add_argument("--pieces", action="store_true", help="also time the server's per-request steps")
    ap.add_argument("--out", default="reports/service", help="folder for protocol_bench.json/.png and server logs")
    return ap


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    import torch
    from lorasa_serve import Engine
    from .servers import ServerProcess
    torch.set_num_threads(1)
    rows_list = [int(r) for r in args.rows.split(",")]
    clients_list = [int(c) for c in args.clients.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lorasa-protocol-bench-"))
    policies = {"shipped": Path(DEFAULT_POLICY), "smax3s5z": None}
    results, livez, pieces = [], {}, []
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(clients_list)) as pool:
        for pol in args.policies.split(","):
            path = policies[pol] or smax_policy(tmp / pol)
            engine = Engine.from_dir(path, device="cpu")
            spec = engine.spec
            spec_d = spec.to_dict()
            env = {"LORASA_POLICY": str(path), "LORASA_STATE_DIR": str(tmp / f"state_{pol}"),
                   "LORASA_MAX_ROWS_PER_REQUEST": str(max(rows_list)),
                   "LORASA_MAX_BATCH_ROWS": str(max(4096, max(rows_list))),
                   "LORASA_MAX_BODY_BYTES": str(256 << 20), "LORASA_WORKERS": "1",
                   "LORASA_TORCH_THREADS": "1",
                   "LORASA_TIMEOUT_S": "600"}  # 8 clients x 4096 JSON rows queue for longer than 30 s
            with ServerProcess(env, out / f"protocol_bench_server_{pol}.log") as srv:
                livez[pol] = run_clients(pool, srv.url, "livez", spec_d, 1, 1, args.seconds)
                print(f"{pol}: /livez p50 {livez[pol]['p50_ms']:.3f} ms", flush=True)
                for rows in rows_list:
                    for clients in clients_list:
                        cell = {"policy": pol, "rows": rows, "clients": clients}
                        runs: dict[str, list[dict]] = {k: [] for k in ("inproc", *PROTOCOLS)}
                        for _ in range(args.rounds):
                            runs["inproc"].append(run_inproc(engine, spec_d, rows, args.seconds))
                            for proto in PROTOCOLS:
                                runs[proto].append(run_clients(pool, srv.url, proto, spec_d, rows, clients,
                                                               args.seconds))
                        for k, rs in runs.items():  # the median round (a failed round counts as slowest)
                            cell[k] = sorted(rs, key=lambda r: -1.0 if "error" in r else r["rows_per_s"])[
                                len(rs) // 2]
                        results.append(cell)
                        print(table([cell]).splitlines()[-1], flush=True)
            if args.pieces:
                pieces += [{"policy": pol, **time_pieces(spec, spec_d, r, 5)} for r in rows_list]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "seconds": args.seconds, "rounds": args.rounds, "results": results, "livez": livez,
              "goals": goals(results, livez), "pieces": pieces}
    (out / "protocol_bench.json").write_text(json.dumps(report, indent=1))
    print(table(results))
    print("livez:", json.dumps({k: round(v["p50_ms"], 3) for k, v in livez.items()}))
    print("goals:", json.dumps(report["goals"], indent=1))
    for p in pieces:
        print("pieces:", json.dumps(p))
    try:
        plot(results, out / "protocol_bench.png")
    except ImportError:
        pass
    print(f"wrote {out / 'protocol_bench.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
