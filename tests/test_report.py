"""lorasa-report: the Student-t interval against known quantiles, learning curves of phase-2 runs with
their base run's part, and a tiny grid trained through run_grid and written up end to end."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
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
    assert report_main(["write", str(tmp_path / "report.toml"), "--runs", str(runs), "--out", str(out),
                        "--notes", str(notes), "--rounds", "3"]) == 0
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
    assert pngs == ["ablation_rank.png", "curves_halfcheetah_2x3.png", "entropy_halfcheetah_2x3.png",
                    "paired_differences.png"]
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


# --- issue 16: compact results, plan, paired statistics ----------------------------------------------
def test_normalised_auc_and_paired_differences_by_hand():
    from training.report.stats import normalised_auc, paired_differences
    curve = [(0, 0.0), (10, 10.0), (20, 10.0)]
    assert normalised_auc(curve) == pytest.approx((50 + 100) / 20)
    assert normalised_auc(curve, start=5) == pytest.approx((5 * 7.5 + 100) / 15)  # interpolated at 5
    assert normalised_auc(list(reversed(curve)), end=10) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        normalised_auc(curve, start=30)
    d = paired_differences({1: 3.0, 2: 5.0, 3: 4.0}, {1: 1.0, 2: 2.0, 3: 4.0, 4: 9.0})
    assert d.values == (2.0, 3.0, 0.0)  # seed 4 has no partner


def test_episode_noise_ratio_by_hand():
    from training.report.stats import episode_noise_ratio
    runs = [[0.0, 2.0], [10.0, 12.0], [20.0, 22.0]]  # episode var 2, n 2 -> SE 1; means 1, 11, 21 -> SD 10
    assert episode_noise_ratio(runs) == pytest.approx(0.1)
    assert math.isnan(episode_noise_ratio([[1.0, 2.0]]))


def test_simulated_schedule_follows_the_runner():
    from training.grid import Run
    from training.report.plan import simulate
    a, c = Run("a", "p", "main", "m", 1, ()), Run("c", "p", "main", "m", 1, ())
    b = Run("b", "p", "main", "m", 1, (), needs="a")
    # jobs 2: a and (b waits) c start at 0; c ends at 8, a at 10, then b runs 10 -> 15
    assert simulate([a, b, c], {"a": 10.0, "b": 5.0, "c": 8.0}, jobs=2) == pytest.approx(15.0)
    assert simulate([a, b, c], {"a": 10.0, "b": 5.0, "c": 8.0}, jobs=1) == pytest.approx(23.0)
    assert simulate([b], {"b": 5.0}, jobs=2) == pytest.approx(5.0)  # its base is done: not waited for


def test_plan_of_the_budget_grid(tmp_path, capsys):
    """reports/grid_budget.toml: >= 5 seeds, several times the 300k budget, about 3 hours on 2 cores by
    the grid's own measured rates; `lorasa-report plan` prints runs x steps / rate."""
    import tomllib
    from training.report.plan import plan
    path = tmp_path / "grid_budget.toml"  # a copy: the whole design, whatever runs are committed beside it
    path.write_text((Path(__file__).parent.parent / "reports" / "grid_budget.toml").read_text())
    raw, grid = tomllib.loads(path.read_text()), Grid.load(path)
    assert len(grid.seeds) >= 5 and {sc["preset"] for sc in grid.scenarios} == {"halfcheetah_2x3", "humanoid_9_8"}
    assert all(grid.budget(sc)[0] >= 3 * 300_000 for sc in grid.scenarios)
    expected = 0.0
    for sc in raw["scenarios"]:
        total, switch = sc.get("total_steps", raw["total_steps"]), sc.get("switch_step", raw["switch_step"])
        for m in sc["methods"]:
            steps = total - switch if m.endswith("lorasa") else total
            expected += len(raw["seeds"]) * steps / raw["plan"]["steps_per_s"][sc["preset"]][m]
    rows, wall = plan(grid, tmp_path / "no-runs", jobs=2)
    assert sum(r.run_seconds for r in rows) == pytest.approx(expected)
    assert expected / 2 <= wall <= expected / 2 * 1.1  # the schedule packs the 2 cores
    assert 2.5 * 3600 <= wall <= 3.5 * 3600
    assert report_main(["plan", str(path), "--runs", str(tmp_path / "no-runs")]) == 0
    assert f"{expected / 3600:.2f} run-hours" in capsys.readouterr().out


def test_plan_of_a_grid_without_a_plan_table_shows_the_example(tmp_path, capsys):
    """A new grid (no [plan] table, no finished runs): one stderr line, exit 2, naming what to add to the
    grid file: a [plan] steps_per_s entry for the first run lacking a rate, as valid TOML."""
    import tomllib
    path = tmp_path / "new.toml"
    path.write_text(_grid_toml(["mappo:ps", "mappo:lorasa"]))
    status = report_main(["plan", str(path), "--runs", str(tmp_path / "no-runs")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "no env-steps/s for halfcheetah_2x3 mappo:ps" in err
    example = err.split("[plan] then ")[1].strip()
    assert tomllib.loads(f"[plan]\n{example}") == {"plan": {"steps_per_s": {"halfcheetah_2x3": {"mappo:ps": 2500}}}}
    both = example.replace("2500 }", '2500, "mappo:lorasa" = 2000 }')
    path.write_text(path.read_text() + "\n[plan]\n" + both + "\n")
    report_main(["plan", str(path), "--runs", str(tmp_path / "no-runs")])  # with the example added: a plan
    assert "run-hours" in capsys.readouterr().out


def _write_compact(d: Path, summary: dict, rows: list[tuple[int, str, float]]) -> None:
    from training.config import preset
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "state.json").write_text(json.dumps({"config": preset("halfcheetah_2x3").to_dict()}))
    lines = ["env_steps,phase,eval_return"] + [f"{s},{p},{v}" for s, p, v in rows]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_paired_section_from_synthetic_compact_results(tmp_path):
    """Runs that exist only as compact results (no runs root): PS, PS+LoRA, NPS with known curves and
    final returns; the paired table's numbers are computed by hand."""
    from training.report.writer import write_report
    (tmp_path / "g.toml").write_text("\n".join([
        "seeds = [1, 2, 3]", "total_steps = 400", "switch_step = 200", "eval_every = 100",
        "[[scenarios]]", 'preset = "halfcheetah_2x3"', 'methods = ["mappo:ps", "mappo:lorasa", "mappo:nps"]']))
    grid = Grid.load(tmp_path / "g.toml")
    base = {"env": "HalfCheetah 2x3", "algo": "mappo", "env_steps": 400, "groups": [0, 0],
            "trainable_params": 10, "actor_params": 10, "train_wall_s": 2.0, "init_from": ""}
    for s in (1, 2, 3):
        def final(v):
            return {"episodes": 2, "mean_return": v, "returns": [v - 1.0, v + 1.0]}
        root = grid.results / "halfcheetah_2x3"
        _write_compact(root / "mappo-ps" / f"seed{s}", {**base, "mode": "ps", "seed": s, "phase_switch_step": -1,
                                                        "final_eval": final(40.0 + s)},
                       [(100, "ps", 10 + s), (200, "ps", 20 + s), (300, "ps", 30 + s), (400, "ps", 40 + s)])
        _write_compact(root / "mappo-lorasa" / f"seed{s}",
                       {**base, "mode": "lorasa", "seed": s, "phase_switch_step": 200, "init_from": "x",
                        "final_eval": final(50.0 + 2 * s)},
                       [(300, "lora", 40 + s), (400, "lora", 60 + s)])
        _write_compact(root / "mappo-nps" / f"seed{s}", {**base, "mode": "nps", "seed": s, "phase_switch_step": -1,
                                                         "final_eval": final(35.0 + s * s)},
                       [(100, "nps", 5 + s), (200, "nps", 15 + s), (300, "nps", 25 + s), (400, "nps", 35 + s)])
    readme = write_report(grid, tmp_path / "gone", tmp_path / "out", rounds=2).read_text()
    row = next(ln for ln in readme.splitlines() if "| PS+LoRA − PS |" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    hw = 4.302653 / math.sqrt(3)  # sd 1, t(0.975, 2)
    # final: (50 + 2s) - (40 + s) = 10 + s; AUC all steps: (15+30+50)/3 - (15+25+35)/3; LoRA phase: 40 - 30
    assert cells[4] == f"+12.0 ± {hw:.1f}, **higher** (seeds +11, +12, +13)"
    assert cells[5].startswith(f"+{95 / 3 - 25:.1f} ± 0.0, **higher**")
    assert cells[6].startswith("+10.0 ± 0.0, **higher**")
    nps = next(ln for ln in readme.splitlines() if "| NPS − PS |" in ln)
    assert "-2.3 ± " in nps and "within noise (seeds -5.0, -3.0, +1.0)" in nps  # s^2 - s - 5
    # episode returns v -+ 1: SE sqrt(2 / 2) = 1; final means 41, 42, 43 (SD 1) / 52, 54, 56 (SD 2)
    assert "| HalfCheetah 2x3 | MAPPO PS | 3 | 2 | 1.00 |" in readme
    assert "| HalfCheetah 2x3 | MAPPO PS+LoRA | 3 | 2 | 0.50 |" in readme
    assert "| MAPPO PS+LoRA | 40.0" not in readme and "| MAPPO PS+LoRA | 54.0 ± " in readme
    for png in ("curves_halfcheetah_2x3.png", "paired_differences.png"):
        assert _png_ok(tmp_path / "out" / "assets" / png) and f"](assets/{png})" in readme


@pytest.mark.parametrize("switches,expected", [({1: 250, 2: 250}, (12.5, 12.5)), ({1: 250, 2: 200}, (12.5, 10.0))])
def test_lora_phase_auc_starts_where_the_lora_runs_really_switched(tmp_path, switches, expected):
    """The grid says switch at 200, but the runs switched at their update boundary 250 (summary.json's
    phase_switch_step): the LoRA-phase AUC window starts there. PS 10+s .. 40+s at 100..400; PS+LoRA
    continues PS (100, 200) with 40+s at 300 and 60+s at 400. From 250: PS (50 * 27.5 + 100 * 35) / 150
    = 32.5 + s, PS+LoRA (50 * 35 + 100 * 50) / 150 = 45 + s: +12.5 (from 200 it would be +10). Under a
    switch rule seeds switch at different steps: each seed's window starts at its own switch."""
    from training.report.paired import paired_rows
    from training.report.results import load_results
    (tmp_path / "g.toml").write_text("\n".join([
        "seeds = [1, 2]", "total_steps = 400", "switch_step = 200", "eval_every = 100",
        "[[scenarios]]", 'preset = "halfcheetah_2x3"', 'methods = ["mappo:ps", "mappo:lorasa"]']))
    grid = Grid.load(tmp_path / "g.toml")
    base = {"env": "HalfCheetah 2x3", "algo": "mappo", "env_steps": 400, "groups": [0, 0],
            "trainable_params": 10, "actor_params": 10, "train_wall_s": 2.0}
    for s in (1, 2):
        root = grid.results / "halfcheetah_2x3"
        final = {"episodes": 1, "mean_return": 1.0, "returns": [1.0]}
        _write_compact(root / "mappo-ps" / f"seed{s}", {**base, "mode": "ps", "seed": s, "init_from": "",
                                                        "phase_switch_step": -1, "final_eval": final},
                       [(100, "ps", 10 + s), (200, "ps", 20 + s), (300, "ps", 30 + s), (400, "ps", 40 + s)])
        _write_compact(root / "mappo-lorasa" / f"seed{s}", {**base, "mode": "lorasa", "seed": s, "init_from": "x",
                                                            "phase_switch_step": switches[s], "final_eval": final},
                       [(300, "lora", 40 + s), (400, "lora", 60 + s)])
    (row,) = paired_rows(grid, load_results(grid, tmp_path / "gone"))
    assert tuple(row.diffs["auc_phase2"].values) == pytest.approx(expected)


def test_budget_grid_switches_at_update_boundaries():
    """A snapshot is taken at the first update boundary at or after the switch step: every switch of
    reports/grid_budget.toml is a multiple of its preset's env steps per update."""
    from training.config import PRESETS
    grid = Grid.load(Path(__file__).parent.parent / "reports" / "grid_budget.toml")
    for sc in grid.scenarios:
        assert not {k for k in sc.get("overrides", {}) if k in ("env.n-envs", "ppo.rollout")}
        cfg = PRESETS[sc["preset"]]
        per_update = cfg.env.n_envs * cfg.ppo.rollout
        total, switch = grid.budget(sc)
        assert switch % per_update == 0 and total % per_update == 0, (sc["preset"], switch, per_update)


def test_grid_resumes_from_compact_results_without_the_runs_root(tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(_grid_toml(["mappo:ps", "mappo:lorasa"]).split("[ablations]")[0])
    grid = Grid.load(tmp_path / "grid.toml")
    runs = tmp_path / "runs"
    assert run_grid(grid, runs, jobs=2) == []
    compact = tmp_path / "grid" / "runs" / "halfcheetah_2x3"
    for m in ("mappo-ps", "mappo-lorasa"):
        assert sorted(p.name for p in (compact / m / "seed1").iterdir()) == ["metrics.csv", "run.json",
                                                                             "state.json", "summary.json"]
        s = json.loads((compact / m / "seed1" / "summary.json").read_text())
        assert len(s["final_eval"]["returns"]) == s["final_eval"]["episodes"] == 1
    ps_metrics = (compact / "mappo-ps" / "seed1" / "metrics.csv").read_text()
    shutil.rmtree(runs)  # a new machine: only the committed compact results
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=2) == [] and not any(runs.glob("*/*"))
    # the LoRA run is missing there: its PS run is trained again for the snapshot, then the LoRA run
    shutil.rmtree(compact / "mappo-lorasa")
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=2) == []
    assert (runs / "halfcheetah_2x3" / "mappo-ps" / "seed1" / "summary.json").is_file()
    assert (compact / "mappo-lorasa" / "seed1" / "summary.json").is_file()

    def evals(text):
        return [r["eval_return"] for r in csv.DictReader(io.StringIO(text))]
    assert evals((runs / "halfcheetah_2x3" / "mappo-ps" / "seed1" / "metrics.csv").read_text()) == evals(ps_metrics)
    assert (compact / "mappo-ps" / "seed1" / "metrics.csv").read_text() == ps_metrics

    # committed results whose phase 1 differs from the retrained one: kept as they are, with a warning
    rows = list(csv.DictReader(io.StringIO(ps_metrics)))
    rows[[r["env_steps"] for r in rows].index("160")]["eval_return"] = "999.0"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    committed = {p.name: p.read_bytes() for p in (compact / "mappo-ps" / "seed1").iterdir()}
    (compact / "mappo-ps" / "seed1" / "metrics.csv").write_text(buf.getvalue())
    committed["metrics.csv"] = buf.getvalue().encode()
    shutil.rmtree(runs)
    shutil.rmtree(compact / "mappo-lorasa")
    capsys.readouterr()
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=2) == []
    out = capsys.readouterr().out
    assert "warning: halfcheetah_2x3/mappo-ps/seed1 was trained again to rebuild its snapshots" in out
    assert "differ from the committed ones at 1 of 1 steps (first at 160: committed 999.0" in out
    assert {p.name: p.read_bytes() for p in (compact / "mappo-ps" / "seed1").iterdir()} == committed


def test_grid_refuses_results_made_with_other_settings(tmp_path, capsys):
    """run.json records each run's resolved config (and the git commit); after a grid edit `run` stops with
    one line naming the run and the differing fields, and trains nothing."""
    toml = _grid_toml(["mappo:ps"]).split("[ablations]")[0]
    (tmp_path / "grid.toml").write_text(toml)
    runs, key = tmp_path / "runs", "halfcheetah_2x3/mappo-ps/seed1"
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=1) == []
    rec = json.loads((tmp_path / "grid" / "runs" / key / "run.json").read_text())
    assert rec["key"] == key and "git_commit" in rec and "--final-eval-episodes" in rec["args"]
    assert (rec["config"]["total_steps"], rec["config"]["final_eval_episodes"], rec["config"]["ppo.rollout"]) \
        == (320, 1, 20)
    assert json.loads((runs / key / "run.json").read_text()) == rec

    def refused(*needles: str) -> None:
        capsys.readouterr()
        status = report_main(["run", str(tmp_path / "grid.toml"), "--runs", str(runs), "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"lorasa-report: error: run {key}: the results in ")
        for n in needles:
            assert n in err, (n, err)
        assert not (tmp_path / "rep").exists()

    (tmp_path / "grid.toml").write_text(toml.replace("final_eval_episodes = 1", "final_eval_episodes = 2"))
    refused("final_eval_episodes: 1 -> 2", "(and 1 more results)", "move the old results aside or restore")
    (tmp_path / "grid.toml").write_text(toml.replace("total_steps = 320", "total_steps = 480"))
    refused("total_steps: 320 -> 480")
    (tmp_path / "grid.toml").write_text(toml)
    (runs / key / "run.json").unlink()  # results from before run.json was recorded
    refused("run.json missing")
    shutil.rmtree(runs)
    assert run_grid(Grid.load(tmp_path / "grid.toml"), runs, jobs=1) == [] and not any(runs.glob("*/*"))


def test_report_write_from_committed_results_alone(tmp_path):
    """`lorasa-report write` on a machine without the runs root: the committed compact results suffice."""
    (tmp_path / "g.toml").write_text("\n".join([
        "seeds = [1]", "total_steps = 400", "switch_step = 200", "eval_every = 100",
        "[[scenarios]]", 'preset = "halfcheetah_2x3"', 'methods = ["mappo:ps"]']))
    base = {"env": "HalfCheetah 2x3", "algo": "mappo", "mode": "ps", "seed": 1, "env_steps": 400, "groups": [0, 0],
            "trainable_params": 10, "actor_params": 10, "train_wall_s": 2.0, "init_from": "",
            "phase_switch_step": -1, "final_eval": {"episodes": 2, "mean_return": 41.5, "returns": [40.5, 42.5]}}
    _write_compact(tmp_path / "g" / "runs" / "halfcheetah_2x3" / "mappo-ps" / "seed1", base,
                   [(200, "ps", 20.0), (400, "ps", 40.0)])
    assert report_main(["write", str(tmp_path / "g.toml"), "--runs", str(tmp_path / "gone"), "--out",
                        str(tmp_path / "out"), "--rounds", "2"]) == 0
    assert "| MAPPO PS | 41.5 (1 seed" in (tmp_path / "out" / "README.md").read_text()


def test_scenario_budgets_and_their_errors(tmp_path):
    from lorasa_serve.cli import UsageError
    head = 'seeds = [1]\ntotal_steps = 400\nswitch_step = 200\n'
    sc = '[[scenarios]]\npreset = "halfcheetah_2x3"\nmethods = ["mappo:ps", "mappo:lorasa"]\n'
    (tmp_path / "g.toml").write_text(head + sc + "total_steps = 900\nswitch_step = 300\n")
    ps, lora = Grid.load(tmp_path / "g.toml").runs
    assert "900" in ps.args and ps.args[ps.args.index("--snapshot-steps") + 1] == "300"
    assert lora.args[lora.args.index("--init-from") + 1].endswith("/snapshots/300")
    assert (ps.trained_steps, lora.trained_steps) == (900, 600)
    (tmp_path / "bad.toml").write_text(head + sc + "switch_step = 900\n")
    with pytest.raises(UsageError, match="switch_step 900 must be between 0 and total_steps 400"):
        Grid.load(tmp_path / "bad.toml")
    (tmp_path / "ab.toml").write_text(head + sc + 'total_steps = 900\n[ablations]\npreset = "halfcheetah_2x3"\n'
                                      'ranks = [4]\n')
    with pytest.raises(UsageError, match="ablations"):
        Grid.load(tmp_path / "ab.toml")


def test_plateau_rule_places_each_seeds_switch(tmp_path):
    """A switch rule: base runs snapshot every `every` steps; a LoRA run's --init-from is filled in from
    its own base run's curve once that has finished (never before), rounded up to a snapshot step."""
    from training.grid import Grid, plateau_step, resolve_args, rule_switch
    rising = [(i * 10, 100.0 * i) for i in range(1, 11)]  # +100 per evaluation: never < 2%
    assert plateau_step(rising, 2, 0.02) is None
    flat = rising[:6] + [(70, 600.0), (80, 601.0), (90, 602.0), (100, 603.0)]
    # first at 90: mean(601, 602) = 601.5 < 1.02 * mean(600, 600) (at 80: 600.5 vs mean(500, 600) = 550)
    assert plateau_step(flat, 2, 0.02) == 90
    metrics = tmp_path / "m.csv"
    rows = ["env_steps,eval_return"] + [f"{s},{v}" for s, v in flat]
    metrics.write_text("\n".join(rows) + "\n")
    assert rule_switch({"every": 20, "window": 2, "min_gain": 0.02, "latest": 100}, metrics) == 100  # 90 -> 100
    assert rule_switch({"every": 50, "window": 2, "min_gain": 0.02, "latest": 50}, metrics) == 50  # capped
    short = tmp_path / "short.csv"
    short.write_text("\n".join(rows[:5]) + "\n")  # the base has not reached `latest` yet
    assert rule_switch({"every": 20, "window": 2, "min_gain": 0.02, "latest": 100}, short) is None
    (tmp_path / "g.toml").write_text(
        'seeds = [1]\ntotal_steps = 3000000\nswitch_step = 2000000\n'
        'switch_rule = { every = 100000, window = 5, min_gain = 0.02, latest = 2000000 }\n'
        '[[scenarios]]\npreset = "halfcheetah_2x3"\nmethods = ["mappo:ps", "mappo:lorasa"]\n')
    grid = Grid.load(tmp_path / "g.toml")
    ps, lora = grid.runs
    snaps = ps.args[ps.args.index("--snapshot-steps") + 1].split(",")
    assert snaps[0] == "100000" and snaps[-1] == "2000000" and len(snaps) == 20
    runs = tmp_path / "runs"
    assert resolve_args(grid, lora, runs) is None  # base not run: no switch yet
    base = runs / ps.key
    base.mkdir(parents=True)
    curve = [(s, 1000.0 * min(s, 1_000_000) / 1_000_000) for s in range(25_000, 3_000_001, 25_000)]
    (base / "metrics.csv").write_text("env_steps,eval_return\n" + "".join(f"{s},{v}\n" for s, v in curve))
    args = resolve_args(grid, lora, runs)
    want = plateau_step(curve, 5, 0.02)
    assert want is not None and 1_000_000 <= want <= 1_300_000
    assert args[args.index("--init-from") + 1] == f"{base}/snapshots/{-(-want // 100000) * 100000}"
