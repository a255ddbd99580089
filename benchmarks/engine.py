"""lorasa-bench: mixed-agent inference, measured side by side in one run.

For each (agents N, rows B) it times one forward of the same mixed batch through:
  ps            the shared backbone alone (the floor: LoRASA cannot beat it)
  engine-lora   Engine, unmerged LoRA (shared GEMM + per-chunk low-rank delta)
  engine-merged Engine, cached merged per-agent weights
  engine-auto   Engine, mode chosen by batch shape (what users get)
  per-agent     the original research code's way: one forward per agent with merged weights
  nps           separate networks per agent (one nn.Module each), one forward per agent
  onnx          ONNX Runtime on the exported multi-agent graph (if exporters + onnxruntime are there)
and prints time per call, rows/s and the ratio to `ps` measured in the same run (median of repeats).
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from lorasa_serve.adapter_layout import adapter_shapes
from lorasa_serve.artifacts import atomic_write, save_policy
from lorasa_serve.backend import ActBackend
from lorasa_serve.cli import ArgumentParser, UsageError, run_cli
from lorasa_serve.errors import DeviceUnavailableError
from lorasa_serve.files import check_output_file
from lorasa_serve.engine import Engine, resolve_device
from lorasa_serve.network import init_adapter, init_backbone
from lorasa_serve.spec import AgentSpec, LoraSpec, PolicySpec

from .timing import latencies_alternating, percentile, time_interleaved

METHODS = ("ps", "engine-lora", "engine-merged", "engine-auto", "per-agent", "nps", "onnx")


@dataclass
class BenchConfig:
    agents: tuple[int, ...] = (2, 8, 100, 1000)
    rows: tuple[str, ...] = ("N", "16N", "4096", "65536")
    obs: int = 205
    act: int = 13
    hidden: int = 64
    rank: int = 8
    action: str = "categorical"
    device: str = "cpu"
    min_time: float = 0.3  # seconds of repeats per measurement
    max_rows: int = 65536
    max_loop_agents: int = 1000  # per-agent loops above this many agents are skipped
    methods: tuple[str, ...] = METHODS
    team_step_calls: int = 2000
    max_onnx_agents: int = 100  # exporting a 1000-agent graph (and verifying it) takes minutes
    seed: int = 0


@dataclass
class Result:
    agents: int
    rows: int
    method: str
    median_s: float
    rows_per_s: float
    ratio_to_ps: float | None = None
    repeats: int = 0


@dataclass
class Report:
    config: dict
    machine: dict
    results: list[Result] = field(default_factory=list)
    team_step: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


# --- policies and the baselines ------------------------------------------------------------------
def make_spec(cfg: BenchConfig, n_agents: int) -> PolicySpec:
    agents = tuple(AgentSpec(f"agent_{i}", cfg.obs, cfg.act) for i in range(n_agents))
    return PolicySpec(agents=agents, hidden=cfg.hidden, action=cfg.action,
                      lora=LoraSpec(rank=cfg.rank, alpha=float(cfg.rank)))


def make_engines(cfg: BenchConfig, spec: PolicySpec) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(cfg.seed)
    backbone = init_backbone(spec, g)
    adapters = {a: init_adapter(spec, g, b_std=0.05) for a in spec.agent_ids}
    engines = {"ps": Engine(spec, backbone, {}, device=cfg.device)}
    for mode in ("lora", "merged", "auto"):
        engines[f"engine-{mode}"] = Engine(spec, backbone, adapters, device=cfg.device, mode=mode)
    engines["engine-merged"].merge()
    return engines, adapters


class ResearchActor(nn.Module):
    """The reference code's actor as nn.Modules: one instance per agent (merged weights or NPS)."""

    def __init__(self, spec: PolicySpec, linears: dict[str, torch.Tensor], backbone: dict):
        super().__init__()
        H, self.spec = spec.hidden, spec
        self.ln_in = nn.LayerNorm(spec.obs_max)
        self.mlp = nn.ModuleList(nn.Linear(*spec.linear_shapes()[f"mlp.{i}"]) for i in range(spec.mlp_depth))
        self.mlp_ln = nn.ModuleList(nn.LayerNorm(H) for _ in range(spec.mlp_depth))
        self.gru_x, self.gru_h = nn.Linear(H, 3 * H), nn.Linear(H, 3 * H)
        self.gru_ln, self.post, self.post_ln = nn.LayerNorm(H), nn.Linear(H, H), nn.LayerNorm(H)
        self.head = nn.Linear(H, spec.act_max)
        mods = {**{f"mlp.{i}": m for i, m in enumerate(self.mlp)}, "gru.x": self.gru_x,
                "gru.h": self.gru_h, "post": self.post, "head": self.head}
        with torch.no_grad():
            for name, m in mods.items():
                m.weight.copy_(linears[name])
                m.bias.copy_(backbone[f"{name}.bias"])

    def forward(self, x, h):  # x [b, obs], h [b, H]
        x = self.ln_in(x)
        for lin, ln in zip(self.mlp, self.mlp_ln):
            x = ln(torch.relu(lin(x)))
        gx, gh = self.gru_x(x), self.gru_h(h)
        H = h.shape[-1]
        r = torch.sigmoid(gx[:, :H] + gh[:, :H])
        z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
        return self.head(self.post_ln(torch.relu(self.post(self.gru_ln(h))))), h


def per_agent_loop(actors: list[nn.Module], slots: np.ndarray) -> Callable:
    """One forward per agent present: select its rows, run its network, scatter back."""
    order = np.argsort(slots, kind="stable")
    bounds = np.cumsum(np.bincount(slots, minlength=len(actors)))

    def run(obs, h):
        out = obs.new_empty(obs.shape[0], actors[0].head.out_features)
        h_out = torch.empty_like(h)
        start = 0
        for a, end in enumerate(bounds):
            if end > start:
                idx = torch.as_tensor(order[start:end], device=obs.device)
                o, hn = actors[a](obs[idx], h[idx])
                out[idx], h_out[idx] = o, hn
            start = end
        return out, h_out
    return run


def rows_for(spec: str, n: int, max_rows: int) -> int | None:
    r = int(spec[:-1]) * n if spec.endswith("N") and spec != "N" else n if spec == "N" else int(spec)
    return r if r <= max_rows and r >= n else None


def bench_grid(cfg: BenchConfig, report: Report, onnx_factory: Callable | None) -> None:
    dev = cfg.device
    for n in cfg.agents:
        spec = make_spec(cfg, n)
        engines, adapters = make_engines(cfg, spec)
        backbone = engines["ps"].backbone()
        loops = {}
        if n <= cfg.max_loop_agents and {"per-agent", "nps"} & set(cfg.methods):
            eng = engines["engine-lora"]
            merged = [ResearchActor(spec, eng.merged_weights(a), backbone).to(dev)
                      for a in spec.agent_ids]
            g = torch.Generator().manual_seed(cfg.seed + 1)
            nps = []
            for _ in range(n):  # independent networks: the NPS upper-bound baseline
                w = init_backbone(spec, g)
                nps.append(ResearchActor(spec, {k: w[f"{k}.weight"] for k in spec.linear_names()}, w).to(dev))
            loops = {"per-agent": merged, "nps": nps}
        onnx_eng = onnx_factory(spec, backbone, adapters) if onnx_factory and "onnx" in cfg.methods else None
        for rspec in cfg.rows:
            B = rows_for(rspec, n, cfg.max_rows)
            if B is None:
                continue
            rng = np.random.default_rng(cfg.seed)
            slots = np.concatenate([np.arange(n), rng.integers(0, n, B - n)])  # every agent present
            rng.shuffle(slots)
            obs = torch.randn(B, cfg.obs, device=dev)
            h = torch.randn(B, cfg.hidden, device=dev) * 0.5
            calls: dict[str, Callable] = {}
            for name, eng in engines.items():
                calls[name] = (lambda e=eng: e.forward(slots, obs, h))
            ref = engines["engine-lora"].forward(slots, obs, h)[0]
            for name in ("engine-merged", "engine-auto"):
                _check_same(calls[name]()[0], ref, name)
            for name, actors in loops.items():
                run = per_agent_loop(actors, slots)
                calls[name] = (lambda r=run: _no_grad(r, obs, h))
            if "per-agent" in calls:
                _check_same(calls["per-agent"]()[0], ref, "per-agent")
            if onnx_eng is not None:
                o_np, h_np = obs.cpu().numpy(), h.cpu().numpy()
                calls["onnx"] = (lambda: onnx_eng.forward(slots, o_np, h_np))
                _check_same(onnx_eng.forward(slots, o_np, h_np)[0], engines["engine-lora"].forward(
                    slots, obs, h)[0], "onnx")
            sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
            order = ["ps"] + [m for m in cfg.methods if m != "ps" and m in calls]  # ps: the baseline
            timed = time_interleaved({m: calls[m] for m in order}, cfg.min_time, sync=sync)
            for name, tm in timed.items():
                t, ratio = tm.seconds, tm.ratio
                report.results.append(Result(n, B, name, t, B / t, ratio, tm.calls))
                print(f"N={n:5d} rows={B:6d} {name:14s} {t * 1e3:9.3f} ms  {B / t:12.0f} rows/s  "
                      f"x{ratio:5.2f} PS", flush=True)
        report.memory[str(n)] = memory_per_agent(spec)


def _check_same(a: torch.Tensor, b: torch.Tensor, name: str, atol: float = 1e-4) -> None:
    """Benchmarks compare like with like: every method must compute the same outputs."""
    diff = (a.cpu() - b.cpu()).abs().max().item()
    if diff > atol:
        raise AssertionError(f"{name} differs from the engine by {diff:.2e}: not timing a wrong result")


def _no_grad(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def memory_per_agent(spec: PolicySpec) -> dict:
    """Bytes each extra agent costs: its adapter (LoRASA) vs a whole actor (NPS), fp32."""
    lora = sum(int(np.prod(s)) for s in adapter_shapes(spec).values()) * 4
    full = sum(int(np.prod(s)) for s in spec.backbone_shapes().values()) * 4
    return {"lorasa_bytes_per_agent": lora, "nps_bytes_per_agent": full, "nps_over_lorasa": full / lora}


def bench_team_step(cfg: BenchConfig, report: Report, n_agents: int = 8) -> None:
    """p50/p99 latency of one decision step of an n-agent team through Engine.act (what an env loop calls)."""
    spec = make_spec(cfg, n_agents)
    engines, _ = make_engines(cfg, spec)
    eng = engines["engine-auto"]
    idx = eng.agent_index(spec.agent_ids)
    obs = torch.randn(n_agents, cfg.obs, device=cfg.device)
    state = torch.zeros(n_agents, cfg.hidden, device=cfg.device)
    pair: dict[str, ActBackend] = {"ps": engines["ps"], "engine-auto": eng}
    states = {name: state for name in pair}

    def step(name: str) -> None:
        states[name] = pair[name].act(idx, obs, states[name]).state
    # alternate the two call by call so load changes hit both alike
    times = latencies_alternating({name: (lambda n=name: step(n)) for name in pair}, cfg.team_step_calls)
    out: dict = {name: {"p50_us": percentile(ts, 50) * 1e6, "p99_us": percentile(ts, 99) * 1e6}
                 for name, ts in times.items()}
    out["agents"] = n_agents
    out["ratio_p50"] = out["engine-auto"]["p50_us"] / out["ps"]["p50_us"]
    report.team_step = out
    print(f"team step ({n_agents} agents, Engine.act): p50 {out['engine-auto']['p50_us']:.0f} us, "
          f"p99 {out['engine-auto']['p99_us']:.0f} us (PS backbone alone: p50 {out['ps']['p50_us']:.0f} us)")


def onnx_factory_or_none(max_agents: int) -> Callable | None:
    """Builds the ONNX Runtime backend (verified multi-agent export) for a policy, if the exporter and
    onnxruntime are installed; None otherwise (the table then has no onnx column)."""
    try:
        import onnxruntime  # noqa: F401

        from exporters import onnx_engine_from_policy
    except ImportError:
        return None

    def build(spec: PolicySpec, backbone: dict, adapters: dict):
        if len(spec.agents) > max_agents:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            save_policy(tmp, spec, {k: v.cpu() for k, v in backbone.items()}, adapters)
            return onnx_engine_from_policy(tmp, threads=torch.get_num_threads())
    return build


def print_table(report: Report) -> None:
    rows = report.results
    methods = [m for m in dict.fromkeys(r.method for r in rows)]
    keys = list(dict.fromkeys((r.agents, r.rows) for r in rows))
    by = {(r.agents, r.rows, r.method): r for r in rows}
    print("\n| agents | rows | " + " | ".join(f"{m} ms (xPS)" for m in methods) + " |")
    print("|---:|---:|" + "---:|" * len(methods))
    for n, b in keys:
        cells = []
        for m in methods:
            r = by.get((n, b, m))
            cells.append("-" if r is None else f"{r.median_s * 1e3:.3f} (x{r.ratio_to_ps:.2f})")
        print(f"| {n} | {b} | " + " | ".join(cells) + " |")


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="lorasa-bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small grid, finishes in under a minute")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 or auto")
    d = BenchConfig()
    ap.add_argument("--agents", type=str, default=None,
                    help=f"comma list of team sizes (default: {','.join(map(str, d.agents))})")
    ap.add_argument("--rows", type=str, default=None,
                    help=f"comma list of batch rows: N (one per agent), 16N, 4096 (default: {','.join(d.rows)})")
    ap.add_argument("--methods", type=str, default=None,
                    help=f"comma list of {', '.join(METHODS)} (default: all)")
    ap.add_argument("--min-time", type=float, default=None,
                    help=f"seconds of repeats per cell (default: {d.min_time}; 0.1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file (default: print only)")
    return ap


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path, int | None]:
    """-> (config, JSON out path, torch threads); UsageError (one line naming the fix) before any work."""
    args = parser().parse_args(argv)
    cfg = BenchConfig(device=_device(args.device))
    if args.quick:
        cfg = BenchConfig(device=cfg.device, agents=(2, 8, 100), rows=("N", "16N", "4096"),
                          min_time=0.1, team_step_calls=500, max_loop_agents=100)
    if args.agents:
        cfg.agents = _ints(args.agents, "--agents")
    if args.rows:
        cfg.rows = tuple(x.strip() for x in args.rows.split(","))
        bad = [r for r in cfg.rows if not _row_spec_ok(r)]
        if bad:
            raise UsageError(f"--rows {','.join(bad)}: use N, a multiple like 16N, or a row count like 4096")
    if args.methods:
        cfg.methods = tuple(x.strip() for x in args.methods.split(","))
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or "ps" not in cfg.methods:
            raise UsageError(f"--methods must include ps and choose from {','.join(METHODS)}"
                             + (f" (unknown: {','.join(bad)})" if bad else ""))
    if args.min_time is not None:
        if not args.min_time > 0:
            raise UsageError(f"--min-time {args.min_time}: pass a positive number of seconds, e.g. 0.3")
        cfg.min_time = args.min_time
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: pass 1 or more")
    out = None if args.out is None else Path(args.out)
    if out is not None and (out.is_dir() or not out.resolve().parent.is_dir()):
        raise UsageError(f"--out {out}: pass a file path in an existing directory")
    if out is not None:
        check_output_file(out)  # a FIFO, a device or a dangling symlink there: refused before any work
    return cfg, out, args.threads


def _device(name: str) -> str:
    try:
        dev = torch.device(name) if name != "auto" else resolve_device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    try:
        return str(resolve_device(dev))
    except DeviceUnavailableError as e:  # a CUDA index past the devices present
        raise UsageError(f"--device {name}: {e}") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: pass a comma list of positive integers, e.g. 2,8,100")
    return values


def _row_spec_ok(spec: str) -> bool:
    body = spec[:-1] if spec.endswith("N") else spec
    return spec == "N" or (body.isdigit() and int(body) > 0)


def run(argv: list[str] | None = None) -> int:
    cfg, out, threads = parse_args(argv)
    if threads:
        torch.set_num_threads(threads)
    report = Report(config=asdict(cfg), machine={
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": cfg.device,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    t0 = time.perf_counter()
    bench_team_step(cfg, report)
    bench_grid(cfg, report, onnx_factory_or_none(cfg.max_onnx_agents))
    print_table(report)
    for n, m in report.memory.items():
        print(f"memory per extra agent (N={n}): LoRASA {m['lorasa_bytes_per_agent']} B, "
              f"NPS {m['nps_bytes_per_agent']} B (x{m['nps_over_lorasa']:.1f})")
    if out is not None:
        atomic_write(out, json.dumps(asdict(report), indent=1).encode())
        print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("lorasa-bench", run, argv)


if __name__ == "__main__":
    sys.exit(main())
