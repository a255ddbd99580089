"""Inference time per team decision (Policy.act and, for servable runs, Engine.act), measured
round-robin across runs on one torch thread, and its JSON cache."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorasa_serve.artifacts import atomic_write

from .results import Cell


@dataclass
class Timed:
    name: str  # "<run key>|policy" or "<run key>|engine"
    fn: Callable[[], object]
    samples: list[float] = field(default_factory=list)


def policy_decision(run_dir: Path) -> Callable[[], object]:
    """One team decision of the run's training actor: Policy.act over all agents of one env."""
    import torch
    from ..trainer import load_run_policy
    policy, _ = load_run_policy(run_dir)
    spec, info = policy.actor.spec, policy.info
    N, g = info.n_agents, torch.Generator().manual_seed(0)
    obs = torch.randn(N, 1, info.obs_max, generator=g)
    h = torch.zeros(N, 1, spec.hidden) if spec.recurrent else None
    reset = torch.zeros(N, 1, dtype=torch.bool)
    avail = torch.ones(N, 1, info.act_max, dtype=torch.bool)

    def act():
        with torch.no_grad():
            return policy.act(obs, h, reset, avail, True, None)

    return act


def engine_decision(run_dir: Path) -> Callable[[], object]:
    """One team decision through the serving Engine: `Engine.act` with one row per agent."""
    import torch
    from lorasa_serve import Engine
    engine = Engine.from_dir(run_dir, device="cpu")
    spec = engine.spec
    ids = engine.agent_index(engine.agent_ids)
    N = len(ids)
    obs = torch.randn(N, spec.obs_max, generator=torch.Generator().manual_seed(0))
    obs *= torch.arange(spec.obs_max) < torch.tensor([a.obs_dim for a in spec.agents]).unsqueeze(1)  # zero padding
    state = torch.zeros(N, spec.hidden) if spec.recurrent else None
    avail = torch.ones(N, spec.act_max, dtype=torch.bool) if spec.action == "categorical" else None
    return lambda: engine.act(ids, obs, state, None, avail, deterministic=True)


def measure_inference(run_dirs: dict[str, Path], rounds: int = 200, warmup: int = 20) -> dict[str, dict]:
    """Median µs per team decision for each run (Policy.act; Engine.act too for servable runs),
    measured round-robin across runs so that machine load affects all alike; 1 torch thread."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed = []
        for key, d in run_dirs.items():
            timed.append(Timed(f"{key}|policy", policy_decision(d)))
            if (d / "policy.json").is_file():
                timed.append(Timed(f"{key}|engine", engine_decision(d)))
        for i in range(warmup + rounds):
            for t in timed:
                t0 = time.perf_counter_ns()
                t.fn()
                if i >= warmup:
                    t.samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, dict] = {key: {} for key in run_dirs}
    for t in timed:
        key, kind = t.name.rsplit("|", 1)
        out[key][f"{kind}_act_us"] = statistics.median(t.samples)
    return out


def inference_times(cells: list[Cell], cache: Path, remeasure: bool = False, rounds: int = 200) -> dict:
    """{run key: {"policy_act_us", "engine_act_us"?}} for the first finished seed of each cell; cached
    in `cache` (all needed runs are measured together whenever one is missing from it)."""
    wanted = {c.done[0].run.key: c.done[0].dir for c in cells if c.done and c.done[0].has_weights}
    data = json.loads(cache.read_text()) if cache.is_file() and not remeasure else {}
    if not wanted or set(wanted) <= set(data.get("runs", {})):
        return data
    data = {"rounds": rounds, "measured_at": utc_now(), "loadavg_1min": loadavg(),
            "torch_threads": 1, "runs": measure_inference(wanted, rounds)}
    atomic_write(cache, json.dumps(data, indent=2).encode())
    return data


def utc_now() -> str:
    """The current time, e.g. '2024-05-01 12:00 UTC' (also the report's timestamp)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loadavg() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
