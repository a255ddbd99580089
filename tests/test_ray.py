"""The Ray backends on a real two-node Ray cluster on loopback (tests/ray_cluster.py; one cluster for the test
session, 1 CPU per node): rollout workers give the local backend's trajectories bit for bit (PS and LoRA
phase, uneven env split, time-limit cuts), send only the adapters in phase 2, fail with a clear error when
one is killed mid-rollout; the grid on Ray gives the local grid's results, retries a run whose worker dies
and reports one that cannot be finished, never leaving a half-written run directory."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import require_extra

require_extra("ray", "ray")
require_extra("mujoco", "gymnasium_robotics", "mujoco")

from ray_cluster import RayCluster  # noqa: E402

from training.actor import Actor  # noqa: E402
from training.config import PRESETS, LoraConfig, PPOConfig, TrainConfig, ModelConfig  # noqa: E402
from training.errors import WorkerLostError  # noqa: E402
from training.grid import Grid, run_grid  # noqa: E402
from training.mappo import Critic, Policy, ValueNorm  # noqa: E402
from training.ray_support import connect  # noqa: E402
from training.rollouts import LocalRollouts  # noqa: E402
from training.trainer import Trainer, build_spec  # noqa: E402

pytestmark = pytest.mark.slow
TIMING = {"wall_s", "sps", "rollout_s", "update_s"}


@pytest.fixture(scope="session")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with RayCluster(cpus_per_node=1, nodes=2) as c:
        ray = connect(c.address)
        yield c
        ray.shutdown()


def _env(address: str, **kw):
    env = replace(PRESETS["halfcheetah_2x3"].env, n_envs=3, workers=0, episode_limit=30)
    return replace(env, backend="ray", ray_address=address, workers=2, **kw)


def _rollouts(src, lora: bool, updates: int = 2):
    """Two rollouts from a fresh actor (seed-fixed; a LoRA actor with nonzero adapters) -> [(rollout,
    episodes, generator state after)] and the actor."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    cfg = TrainConfig()
    actor = Actor.new_ps(build_spec(src.info, cfg), g, -0.7)
    if lora:
        spec = replace(actor.spec, lora=replace(actor.spec.lora, log_std_offset=True))
        actor = Actor.lora_from_base(actor, g, spec, "reference")
        with torch.no_grad():
            for t in actor.trainable.values():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    policy, critic = Policy.build(actor, src.info), Critic(src.info.state_dim, 32)
    cur = src.start(7, torch.zeros(src.info.n_agents, src.n_envs, actor.spec.hidden))
    out = []
    for _ in range(updates):
        ro, cur, eps = src.collect(policy, critic, ValueNorm(), cur, 40, 0.99, g)
        out.append((ro, eps, g.get_state().clone()))
    return out, actor


def _same_episodes(a, b) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y))
                                    for ea, eb in zip(a, b) for x, y in zip(ea, eb))


@pytest.mark.parametrize("lora", [False, True], ids=["ps", "lora"])
def test_ray_rollouts_equal_the_local_backend(cluster, lora):
    from training.ray_rollouts import RayRollouts, nbytes
    ray_cfg = _env(cluster.address)
    local = LocalRollouts(replace(ray_cfg, backend="local", workers=0))
    remote = RayRollouts(ray_cfg)
    try:
        (want, actor), (got, _) = _rollouts(local, lora), _rollouts(remote, lora)
    finally:
        local.close()
        remote.close()
    cuts = 0
    for (a, ea, ga), (b, eb, gb) in zip(want, got):
        for k in a.__dataclass_fields__:
            x, y = getattr(a, k), getattr(b, k)
            assert torch.equal(x, y), k
        assert _same_episodes(ea, eb) and len(ea) > 0 and torch.equal(ga, gb)
        cuts += int(a.end.sum())
    assert cuts > 0  # episodes (limit 30) end inside the 40-step rollouts
    traffic = remote.traffic[actor.kind]
    rng = torch.Generator().get_state().numel()
    assert traffic["weights_per_update"] == nbytes(actor.trainable) + rng
    assert traffic["base_once"] == nbytes(actor.frozen)
    if lora:  # phase 2: only the adapters and log-std offsets, a fraction of the backbone
        assert set(actor.trainable) == {k for k in actor.trainable if k.endswith((".lora_a", ".lora_b"))} | \
            {"log_std_offset"}
        assert nbytes(actor.trainable) < nbytes(actor.frozen) / 2


def _tiny(out: Path, **env) -> TrainConfig:
    base = PRESETS["halfcheetah_2x3"]
    env = {"workers": 0, **env}
    return replace(base, env=replace(base.env, n_envs=3, episode_limit=40, **env),
                   model=ModelConfig(hidden=16), ppo=replace(PPOConfig(), rollout=20, critic_hidden=16),
                   lora=LoraConfig(rank=2, alpha=2.0), mode="lorasa", total_steps=180, switch_step=60, eval_every=60,
                   eval_episodes=1, final_eval_episodes=1, save_every=60, out=str(out), tensorboard=False)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def test_trainer_on_ray_equals_local_and_counts_bytes_per_phase(cluster, tmp_path):
    """lorasa-train --env.backend ray (PS, then LoRA from the switch): the same metrics as local."""
    local = Trainer(_tiny(tmp_path / "local")).train(progress=False)
    from training.ray_rollouts import nbytes
    trainer = Trainer(_tiny(tmp_path / "ray", backend="ray", workers=2, ray_address=cluster.address))
    remote = trainer.train(progress=False)
    assert _rows(tmp_path / "local" / "metrics.csv") == _rows(tmp_path / "ray" / "metrics.csv")
    assert {r["phase"] for r in _rows(tmp_path / "ray" / "metrics.csv")} == {"ps", "lora"}
    assert remote["final_eval"] == local["final_eval"]
    t = remote["ray_traffic_bytes"]
    rng = torch.Generator().get_state().numel()  # the sampling state, sent with the weights
    assert t["ps"]["weights_per_update"] == t["lora"]["base_once"] + rng  # phase 1: the whole actor
    adapters = nbytes(trainer.actor.trainable)  # phase 2: the LoRA A, B and log-std offsets only
    assert set(trainer.actor.trainable) - {"log_std_offset"} == {k for k in trainer.actor.trainable
                                                                 if k.endswith((".lora_a", ".lora_b"))}
    assert t["lora"]["weights_per_update"] == adapters + rng < t["ps"]["weights_per_update"]


def test_worker_killed_mid_rollout_is_a_clear_error(cluster):
    from training.envs.fixed_cost import FixedCost
    from training.ray_rollouts import RayRollouts
    cfg = replace(_env(cluster.address), n_envs=2)
    src = RayRollouts(cfg, FixedCost(step_s=0.02, episode_limit=1000))
    result: dict = {}

    def collect():
        try:
            _rollouts(src, lora=False, updates=1)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    th = threading.Thread(target=collect)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not cluster.processes("ray::RolloutWorker.collect") and time.monotonic() < deadline:
            time.sleep(0.1)
        busy = cluster.processes("ray::RolloutWorker.collect")
        assert busy, "no rollout worker started collecting"
        time.sleep(0.3)
        os.kill(busy[0], signal.SIGKILL)
        th.join(60)
        assert not th.is_alive()
    finally:
        src.close()
    err = result.get("error")
    assert isinstance(err, WorkerLostError), err
    assert "died during the rollout" in str(err) and "--resume" in str(err)


TINY = {"env.n-envs": 2, "ppo.rollout": 20, "env.episode-limit": 40, "model.hidden": 16,
        "ppo.critic-hidden": 16, "env.workers": 0}


def _grid(tmp: Path, name: str, methods: list[str], seeds=(1,)) -> Grid:
    overrides = ", ".join(f'"{k}" = {v}' for k, v in TINY.items())
    (tmp / f"{name}.toml").write_text("\n".join([
        f"seeds = {list(seeds)}", "total_steps = 160", "switch_step = 80", "eval_every = 80", "eval_episodes = 1",
        "final_eval_episodes = 1", "[[scenarios]]", 'preset = "halfcheetah_2x3"',
        f"methods = {json.dumps(methods)}", f"overrides = {{ {overrides} }}"]))
    return Grid.load(tmp / f"{name}.toml")


def _compact(grid: Grid, key: str) -> tuple[list[dict], dict]:
    d = grid.results / key
    return _rows(d / "metrics.csv"), json.loads((d / "summary.json").read_text())["final_eval"]


def test_grid_on_ray_gives_the_local_results(cluster, tmp_path):
    from training.grid_ray import RayLauncher
    methods = ["mappo:ps", "mappo:lorasa"]
    local, remote = _grid(tmp_path, "local", methods), _grid(tmp_path, "ray", methods)
    assert run_grid(local, tmp_path / "runs_local", jobs=2) == []
    runs = tmp_path / "runs_ray"
    assert run_grid(remote, runs, launcher=RayLauncher(runs, cluster.address)) == []
    for r in remote.runs:
        assert _compact(local, r.key) == _compact(remote, r.key)
    ps = runs / "halfcheetah_2x3" / "mappo-ps" / "seed1"
    assert (ps / "snapshots" / "80" / "train_state" / "state.json").is_file()  # shipped back for resume
    assert not [p for p in runs.rglob("*") if p.name.endswith((".incoming", ".replaced"))]
    assert "--init-from /tmp/lorasa-grid-" in (runs / "halfcheetah_2x3/mappo-lorasa/seed1/train.log").read_text()


def _kill_training_worker(cluster: RayCluster, timeout: float = 60) -> bool:
    """SIGKILL the Ray worker running a lorasa-train task (its child dies with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in cluster.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if b"training.cli" in cmd and b"lorasa-grid-" in cmd:
                os.kill(parent, signal.SIGKILL)
                return True
        time.sleep(0.1)
    return False


def _run_in_thread(grid: Grid, runs: Path, launcher) -> tuple[threading.Thread, dict]:
    res: dict = {}
    th = threading.Thread(target=lambda: res.setdefault("failed", run_grid(grid, runs, launcher=launcher)))
    th.start()
    return th, res


def test_grid_run_whose_worker_dies_is_retried_or_reported(cluster, tmp_path, capsys):
    from training.grid_ray import RayLauncher
    grid = _grid(tmp_path, "g", ["mappo:ps"], seeds=(1, 2))
    runs = tmp_path / "runs"
    first, second = (grid.runs[0], grid.runs[1])
    one = replace(grid, runs=[first])
    th, res = _run_in_thread(one, runs, RayLauncher(runs, cluster.address, retries=1))
    assert _kill_training_worker(cluster)
    th.join(300)
    assert res["failed"] == [] and (grid.results / first.key / "summary.json").is_file()  # retried
    stale = [d for d in Path("/tmp").glob("lorasa-grid-*-*") if not Path(f"/proc/{d.name.split('-')[2]}").exists()]
    assert stale == []  # the killed task's temp runs root was removed by the retry

    capsys.readouterr()
    two = replace(grid, runs=[second])
    th, res = _run_in_thread(two, runs, RayLauncher(runs, cluster.address, retries=0))
    assert _kill_training_worker(cluster)
    th.join(300)
    assert res["failed"] == [second.key]
    assert f"FAILED {second.key}: its Ray task failed after 1 tries" in capsys.readouterr().out
    out = runs / second.key
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # as before the launch: nothing half-written
    assert not (grid.results / second.key).exists()
    from training.grid_ray import _remove_stale_dirs
    left = [d for d in Path("/tmp").glob("lorasa-grid-*-*") if not Path(f"/proc/{d.name.split('-')[2]}").exists()]
    _remove_stale_dirs()  # what the node's next task does first
    assert left and not any(d.exists() for d in left)


def test_report_run_on_ray_errors_are_one_line_before_anything_trains(cluster, tmp_path, capsys, monkeypatch):
    """`lorasa-report run --ray`: a run asking for more CPUs (--env.workers 2) than the cluster's largest node
    has (1 here) is refused by check_cluster_fits, one line, exit 2, before anything is trained (Ray would
    queue it forever); without the ray module the error names the extra."""
    import sys

    from training.report import main as report_main
    _grid(tmp_path, "big", ["mappo:ps"])
    path = tmp_path / "big.toml"
    path.write_text(path.read_text().replace('"env.workers" = 0', '"env.workers" = 2'))
    runs = tmp_path / "runs"
    args = ["run", str(path), "--runs", str(runs), "--out", str(tmp_path / "report"), "--ray", cluster.address]
    for without_ray, words in ((False, "run halfcheetah_2x3/mappo-ps/seed1 needs 2 CPUs (--env.workers) but "
                                       "the largest node of the Ray cluster has 1"),
                               (True, "Ray is not installed: the Ray backends need the 'ray' extra (pip install "
                                      "'lorasa-serve[ray]')")):
        if without_ray:
            monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when absent
        status = report_main(args)
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and words in err, err
        assert not list(runs.rglob("summary.json")) and not (tmp_path / "report").exists()


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    import sys

    from training.cli import main as train_main
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is absent
    status = train_main(["--preset", "halfcheetah_2x3", "--env.backend", "ray", "--env.workers", "2",
                         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "pip install 'lorasa-serve[ray]'" in err
