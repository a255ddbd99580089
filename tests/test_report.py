"""lorasa-report: the Student-t interval against known quantiles, learning curves of phase-2 runs with
their base run's part, and a tiny grid trained through run_grid and written up end to end."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from training.grid import Grid, run_grid
from training.report import (Stats, betainc, concat_rows, main as report_main, mean_curve, overlap, t_cdf,
                             t_quantile)


@pytest.mark.parametrize("dof, want", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (5, 2.570582),
                                       (10, 2.228139), (30, 2.042272)])
def test_t_quantile_known_values(dof, want):
    assert t_quantile(0.975, dof) == pytest.approx(want, abs=1e-6)
    assert t_quantile(0.025, dof) == pytest.approx(-want, abs=1e-6)


def test_t_quantile_inverts_the_cdf():
    assert t_quantile(0.995, 4) == pytest.approx(4.604095, abs=1e-6)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    for dof in (1, 2, 9, 100):
        for p in (0.6, 0.9, 0.999):
            assert t_cdf(t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-10)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.959964, abs=1e-3)  # -> the normal quantile


def test_regularized_incomplete_beta():
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert betainc(2.0, 2.0, 0.0) == 0.0 and betainc(2.0, 2.0, 1.0) == 1.0


def test_stats_interval():
    s = Stats((1.0, 2.0, 3.0))
    assert s.n == 3 and s.mean == pytest.approx(2.0)
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)  # sd 1, t(0.975, 2)
    assert s.fmt() == "2.0 ± 2.5"
    one = Stats((5.0,))
    assert math.isnan(one.half_width) and "no interval" in one.fmt()
    assert overlap(s, Stats((4.0, 4.5, 5.0))) is True
    assert overlap(Stats((1.0, 1.1, 1.2)), Stats((4.0, 4.1, 4.2))) is False
    assert overlap(s, one) is None


def _row(step: int, phase: str, ret: str = "") -> dict:
    return {"env_steps": str(step), "phase": phase, "eval_return": ret}


def test_phase2_curve_starts_with_the_base_run():
    base = [_row(40, "ps"), _row(80, "ps", "1.0"), _row(120, "ps"), _row(160, "ps", "2.0")]
    own = [_row(200, "lora"), _row(240, "lora", "3.0")]
    rows, switch = concat_rows(base, own)
    assert [r["env_steps"] for r in rows] == ["40", "80", "120", "160", "200", "240"] and switch == 160
    # a snapshot copied later than the switch would overlap the phase-2 rows: the base part stops before
    rows, switch = concat_rows(base + [_row(200, "ps", "9.0")], own)
    assert [r["env_steps"] for r in rows][-3:] == ["160", "200", "240"] and rows[-2]["phase"] == "lora"
    assert concat_rows([], own) == (own, None)


def test_mean_curve_across_seeds():
    c = mean_curve([[(80, 1.0), (160, 3.0)], [(80, 2.0), (160, 5.0)], [(80, 3.0)]])
    assert c.steps == [80, 160] and [s.n for s in c.stats] == [3, 2]
    assert c.stats[0].mean == pytest.approx(2.0) and c.stats[1].mean == pytest.approx(4.0)


TINY = {"env.n-envs": 2, "ppo.rollout": 20, "env.episode-limit": 40, "model.hidden": 16,
        "ppo.critic-hidden": 16}


def _grid_toml(methods: list[str]) -> str:
    overrides = ", ".join(f'"{k}" = {v}' for k, v in TINY.items())
    return "\n".join([
        "seeds = [1]", "total_steps = 320", "switch_step = 160", "eval_every = 160", "eval_episodes = 1",
        "final_eval_episodes = 1", "[[scenarios]]", 'preset = "halfcheetah_2x3"',
        f"methods = {json.dumps(methods)}", f"overrides = {{ {overrides} }}",
        "[ablations]", 'preset = "halfcheetah_2x3"', "ranks = [2]", f"overrides = {{ {overrides} }}"])


def _png_ok(path: Path) -> bool:
    import matplotlib.image
    img = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.ndim == 3 and min(img.shape[:2]) > 100


def test_tiny_grid_end_to_end(tmp_path):
    methods = ["mappo:ps", "mappo:lorasa", "a2po:nps"]
    (tmp_path / "grid.toml").write_text(_grid_toml(methods))
    runs, out = tmp_path / "runs", tmp_path / "report"
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=2) == []
    # the report's grid also declares a method that never ran: it must be listed as missing
    (tmp_path / "report.toml").write_text(_grid_toml(methods + ["mappo:mtl"]))
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written reading.\n")
    report_main(["write", str(tmp_path / "report.toml"), "--runs", str(runs), "--out", str(out),
                 "--notes", str(notes), "--rounds", "3"])
    readme = (out / "README.md").read_text()

    for method, label in [("mappo-ps", "MAPPO PS"), ("mappo-lorasa", "MAPPO PS+LoRA"), ("a2po-nps", "A2PO NPS")]:
        s = json.loads((runs / "halfcheetah_2x3" / method / "seed1" / "summary.json").read_text())
        row = next(ln for ln in readme.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith(f"{s['final_eval']['mean_return']:.1f} (1 seed")
        assert cells[2] == f"{s['final_eval']['mean_return']:.1f}"
        assert cells[3] == f"{s['trainable_params']:,}" and cells[4] == f"{s['actor_params']:,}"
        assert re.fullmatch(r"[\d,.]+", cells[6]), row  # Policy.act µs measured
        assert cells[-1] == "1/1"
    lora = json.loads((runs / "halfcheetah_2x3/mappo-lorasa/seed1/summary.json").read_text())
    assert lora["trainable_params"] < lora["actor_params"]

    assert "| MAPPO MTL | n/a |" in readme and "0/1" in readme
    assert "missing `halfcheetah_2x3/mappo-mtl/seed1`: not run" in readme
    assert "## Reading\n\nHand-written reading." in readme
    assert "| 2 |" in readme and "| 8 (main run) |" in readme  # rank ablation with the main run's rank
    assert "PS+LoRA vs PS" in readme and "lorasa-report run" in readme

    pngs = sorted(p.name for p in (out / "assets").glob("*.png"))
    assert pngs == ["ablation_rank.png", "curves_halfcheetah_2x3.png"]
    assert all(_png_ok(out / "assets" / p) for p in pngs)
    for p in pngs:
        assert f"](assets/{p})" in readme
    timings = json.loads((out / "assets" / "inference.json").read_text())["runs"]
    assert set(timings["halfcheetah_2x3/mappo-lorasa/seed1"]) == {"policy_act_us", "engine_act_us"}
    assert set(timings["halfcheetah_2x3/a2po-nps/seed1"]) == {"policy_act_us"}  # no servable policy


def test_paired_differences_and_table_cells():
    from training.report.writer import _paired_text, md_table
    d = Stats((426.0, -370.0, 17.0))
    assert _paired_text(d).startswith("+24.3 ± ") and "(seeds: +426, -370, +17)" in _paired_text(d)
    assert " higher " in _paired_text(Stats((245.0, 205.0, 190.0)))  # the interval excludes 0
    table = md_table(["Scenario", "x"], [["Humanoid 9|8", "1"]])
    assert table.splitlines()[2] == "| Humanoid 9\\|8 | 1 |"  # one cell, not two
