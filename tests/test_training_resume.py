"""`lorasa-train --resume` after a killed run: metrics.csv and TensorBoard are cut back to the checkpoint's
env step (then logged again by the resumed run), and wall_s continues from the checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training.cli import main as train_main
from training.plots import read_metrics

TINY = ["--env.episode-limit", "30", "--env.n-envs", "2", "--env.workers", "0", "--model.hidden", "16",
        "--ppo.rollout", "20", "--ppo.chunk", "10", "--ppo.epochs", "1", "--ppo.critic-hidden", "32",
        "--lora.rank", "2", "--lora.alpha", "4", "--switch-step", "80", "--eval-every", "80",
        "--eval-episodes", "1", "--final-eval-episodes", "1", "--save-every", "80"]


def switch_lines(rows: list[dict]) -> list[int]:
    """The x positions training.plots.plot_learning_curves draws a switch line at (same expression)."""
    return [int(r["env_steps"]) for a, r in zip(rows, rows[1:]) if a["phase"] != r["phase"]]


def tb_steps(logdir: Path, tag: str) -> list[int]:
    """The steps TensorBoard shows for `tag` (its reader applies purge_step's SessionLog.START)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_after_a_kill_truncates_metrics_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    # 40 env steps per update; the switch at 80; a checkpoint at 80 (kept as the snapshot too)
    assert train_main(["--mode", "lorasa", "--out", str(out), "--total-steps", "160", "--snapshot-steps", "80",
                       *TINY]) == 0
    assert [r["env_steps"] for r in read_metrics(out / "metrics.csv")] == ["40", "80", "120", "160"]
    # the kill: the last whole checkpoint is the one at 80 (phase ps), the logs already run to 160
    shutil.rmtree(out / "train_state")
    shutil.copytree(out / "snapshots" / "80" / "train_state", out / "train_state")
    (out / "summary.json").unlink()
    ckpt = json.loads((out / "train_state" / "state.json").read_text())["counters"]
    assert ckpt["env_steps"] == 80 and ckpt["wall_s"] > 0
    killed_rows = read_metrics(out / "metrics.csv")

    assert train_main(["--resume", str(out), "--total-steps", "200"]) == 0
    rows = read_metrics(out / "metrics.csv")
    steps = [int(r["env_steps"]) for r in rows]
    assert steps == [40, 80, 120, 160, 200]  # monotonic, no step twice
    assert rows[:2] == killed_rows[:2]  # the rows up to the checkpoint are kept as they were
    assert [r["phase"] for r in rows] == ["ps", "ps", "lora", "lora", "lora"]
    assert switch_lines(rows) == [120]  # the one real switch (the first LoRA update ends at 120)
    wall = [float(r["wall_s"]) for r in rows]
    assert wall == sorted(wall) and wall[2] >= ckpt["wall_s"]  # continues from the checkpoint's time
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 200 and summary["train_wall_s"] >= wall[-1]
    for tag in ("sps", "wall_s", "updates"):  # written every update (train_return is NaN before episodes end)
        assert tb_steps(out / "tb", tag) == [40, 80, 120, 160, 200], tag
