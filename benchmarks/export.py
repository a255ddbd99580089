"""Export benchmark: export timings, sizes and max diffs, then Engine vs onnxruntime side by side.

    python -m benchmarks.export [--agents 8] [--hidden 64] [--threads 1] [--json out.json] [--png out.png]

Builds a Humanoid 9|8-like policy (obs 242/170, act 9/8 alternating, MAPPO init, rank-8 adapters on
all 7 Linears), exports it both ways (`--merge`: safetensors + one ONNX per agent; multi-agent ONNX
with dense and with gather LoRA), then times `act` on mixed batches for the Engine and each ONNX
flavour, interleaved in one run (round-robin per repeat, median), and prints ratios to the Engine.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from exporters.pipeline import ExportConfig, ExportReport, export_policy
from lorasa_serve import AgentSpec, Engine, LoraSpec, PolicySpec, init_adapter, init_backbone, save_policy
from lorasa_serve.backend import ActBackend
from lorasa_serve.cli import ArgumentParser, run_cli
from lorasa_serve.onnx_backend import OnnxEngine

from .timing import time_round_robin


def build_policy(directory: Path, agents: int, hidden: int, rank: int, seed: int = 0) -> PolicySpec:
    sizes = [(242, 9), (170, 8)]
    spec = PolicySpec(agents=tuple(AgentSpec(f"agent_{i}", *sizes[i % 2]) for i in range(agents)),
                      hidden=hidden, lora=LoraSpec(rank=rank, alpha=float(rank)))
    g = torch.Generator().manual_seed(seed)
    adapters = {a: init_adapter(spec, g, b_std=0.05) for a in spec.agent_ids}
    return save_policy(directory, spec, init_backbone(spec, g), adapters)


def run_exports(policy: Path, root: Path, merged: bool) -> dict[str, tuple[Path, ExportReport, float]]:
    runs = {"merged": dict(merge=True)} if merged else {}
    runs.update(multi_dense=dict(lora_impl="dense"), multi_gather=dict(lora_impl="gather"))
    out = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        report = export_policy(ExportConfig(policy, root / name, progress=True, **kw))
        out[name] = (root / name, report, time.perf_counter() - t0)
        print(f"\n[{name}] total {out[name][2]:.1f} s\n{report.table()}")
        if not report.ok:
            raise SystemExit(f"export {name} failed verification")
    return out


def time_act(backends: dict[str, ActBackend], spec: PolicySpec, rows: list[int], repeats: int,
             seed: int = 0) -> dict[int, dict[str, float]]:
    """Median seconds per `act` call, backends interleaved within every repeat."""
    g = torch.Generator().manual_seed(seed)
    result = {}
    for B in tqdm(rows, desc="timing", unit="batch size"):
        ids = np.asarray(torch.randint(len(spec.agents), (B,), generator=g))  # agent indices, mixed
        obs = torch.randn(B, spec.obs_max, generator=g)
        dims = torch.tensor([a.obs_dim for a in spec.agents])[torch.as_tensor(ids)]  # [B]
        obs[torch.arange(spec.obs_max) >= dims[:, None]] = 0.0  # each row its agent's obs, zero-padded
        h = torch.randn(B, spec.hidden, generator=g) if spec.recurrent else None
        reset = torch.zeros(B, dtype=torch.bool)
        calls = {name: (lambda be=be: be.act(ids, obs, h, reset)) for name, be in backends.items()}
        result[B] = {k: t.seconds for k, t in time_round_robin(calls, repeats, warmup=3).items()}
    return result


def print_timing(timing: dict[int, dict[str, float]]) -> None:
    names = list(next(iter(timing.values())))
    print("\nrows  " + "  ".join(f"{n:>22}" for n in names))
    for B, t in timing.items():
        cells = [f"{t[n] * 1e6:9.0f} us ({t[n] / t['engine']:4.2f}x)" for n in names]
        print(f"{B:<5} " + "  ".join(f"{c:>22}" for c in cells))


def plot(timing: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, rows = list(next(iter(timing.values()))), list(timing)
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(rows)) + i * w, [timing[B][n] / timing[B]["engine"] for B in rows], w, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + w * (len(names) - 1) / 2, [f"{B} rows" for B in rows])
    ax.set_ylabel("time per act() / Engine (lower is faster)")
    ax.set_title("onnxruntime backends vs Engine, mixed-agent batches (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=8, help="agents of the random policy")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the random policy")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random policy")
    p.add_argument("--rows", type=str, default="8,128,4096", help="batch sizes (rows of mixed agents)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per backend and batch size")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for torch and onnxruntime alike (1: robust on a shared machine)")
    p.add_argument("--no-merged", action="store_true", help="skip the per-agent (--merge) exports")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--png", type=Path, default=None, help="also draw the timings here")
    return p


def run(argv: list[str] | None) -> int:
    a = parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = build_policy(root / "policy", a.agents, a.hidden, a.rank)
        exports = run_exports(root / "policy", root, not a.no_merged)
        backends = {"engine": Engine.from_dir(root / "policy", device="cpu", mode="auto"),
                    "onnx multi dense": OnnxEngine.from_dir(exports["multi_dense"][0], threads=a.threads),
                    "onnx multi gather": OnnxEngine.from_dir(exports["multi_gather"][0], threads=a.threads)}
        if "merged" in exports:
            backends["onnx per-agent merged"] = OnnxEngine.from_dir(exports["merged"][0], threads=a.threads)
        timing = time_act(backends, spec, [int(x) for x in a.rows.split(",")], a.repeats)
    print_timing(timing)
    import onnxruntime
    print(f"threads {a.threads} (torch and onnxruntime), torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")
    if a.png:
        plot(timing, a.png)
    if a.json:
        a.json.write_text(json.dumps({
            "exports": {k: {"seconds": s, "artifacts": [vars(r) for r in rep.results]}
                        for k, (_, rep, s) in exports.items()},
            "act_seconds": {str(B): t for B, t in timing.items()}}, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m benchmarks.export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
