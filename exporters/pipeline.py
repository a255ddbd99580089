"""The export run: check arguments, build each artifact, verify it, publish it by rename, report.

Layout of OUT (the runtime's contract, `lorasa_serve.onnx_contract`):
    policy.json                 the source spec (all agents), read by OnnxEngine
    manifest.json               what was exported: files, sizes, sha256s, max diffs, I/O names, log_std, notes
    merged/<agent>/             --merge: plain single-agent policy dir (policy.json, backbone.safetensors)
    onnx/<agent>.onnx           --merge: one graph per agent, merged weights
    onnx/multi_agent.onnx       no --merge: one graph, agent_index input, stacked adapters

Every artifact is written to a temporary name, verified against the Engine over every rollout
(random observations, plus real ones when the environment is known), and only then renamed into
place. A failed artifact leaves no file at its final path; the others are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorasa_serve import Engine
from lorasa_serve import onnx_contract as contract
from lorasa_serve.artifacts import SPEC_FILE, atomic_write, default_mode
from lorasa_serve.errors import LorasaError
from lorasa_serve.onnx_contract import MULTI_AGENT, input_names, output_names

from . import merged as merged_mod
from .errors import ExportError, VerificationError
from .modules import LoraImpl, MergedAgentActor, MultiAgentActor
from .observations import ObsRollout, env_rollout, random_rollout, real_env_config
from .onnx_export import EXAMPLE_BATCH, MIN_OPSET, export_bytes, require_onnx
from .verify import VerifyConfig, agent_rows, engine_step, mixed_rows, onnx_step, rollout_parity

log = logging.getLogger("lorasa_serve.export")
FORMATS = ("safetensors", "onnx")
MIN_STEPS = 20  # recurrent steps every artifact is verified over


@dataclass(frozen=True)
class ExportConfig:
    policy_dir: Path
    out: Path
    merge: bool = False
    agents: tuple[str, ...] | None = None  # None: every agent
    formats: tuple[str, ...] | None = None  # None: safetensors+onnx with merge, onnx without
    opset: int = 18
    lora_impl: LoraImpl = "auto"  # multi-agent graph only
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    steps: int = 24  # rollout length (recurrent steps)
    envs: int = 4  # environments (rows per agent) per step
    reset_prob: float = 0.15  # extra random resets on top of episode starts
    seed: int = 0
    progress: bool = True
    peft: bool = False  # PEFT adapter directories instead (exporters/peft_export.py)


@dataclass
class ArtifactResult:
    agent: str  # agent id, or "*" for the multi-agent graph
    kind: str  # "safetensors" or "onnx"
    files: list[str]  # relative to OUT
    size: int  # bytes
    max_diff: float | None  # over every rollout; None when it failed before verification
    seconds: float
    error: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # file -> its digest (OnnxEngine checks graphs')


@dataclass
class ExportReport:
    out: Path
    results: list[ArtifactResult]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.results)

    def table(self) -> str:
        rows = [("agent", "kind", "files", "size", "max abs diff", "seconds")]
        for r in self.results:
            diff = "FAILED" if r.error else f"{r.max_diff:.2e}"
            rows.append((r.agent, r.kind, ", ".join(r.files) or "-", _size(r.size), diff, f"{r.seconds:.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def check_config(cfg: ExportConfig, engine: Engine) -> tuple[list[str], tuple[str, ...]]:
    """-> (agents, formats); ExportError for anything wrong, before any file is written."""
    formats = cfg.formats or (FORMATS if cfg.merge else ("onnx",))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
    if "safetensors" in formats and not cfg.merge:
        raise ExportError("--format safetensors needs --merge (the unmerged policy directory already is "
                          "safetensors)")
    agents = list(cfg.agents) if cfg.agents else engine.agent_ids
    unknown = [a for a in agents if a not in engine.agent_ids]
    if unknown:
        raise ExportError(f"unknown agent(s) {unknown}; the policy has {engine.agent_ids}")
    if cfg.agents and not cfg.merge:
        raise ExportError("--agents selects per-agent exports and needs --merge (the multi-agent graph "
                          "holds every agent)")
    if Path(cfg.out).resolve() == Path(cfg.policy_dir).resolve():
        raise ExportError("--out must differ from the policy directory")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ExportError(f"--out {cfg.out} is a file: pass a directory (created if missing)")
    if cfg.steps < MIN_STEPS or cfg.envs < 1 or not (cfg.verify.tol >= 0 and cfg.verify.rtol >= 0):
        raise ExportError(f"verification needs steps >= {MIN_STEPS}, envs >= 1 and tolerances >= 0")
    if "onnx" in formats:
        require_onnx()
        if cfg.opset < MIN_OPSET:
            raise ExportError(f"--opset {cfg.opset} is too old: need >= {MIN_OPSET} (LayerNormalization)")
    return agents, tuple(formats)


def load_rollouts(cfg: ExportConfig, engine: Engine) -> tuple[list[ObsRollout], list[str]]:
    """Random observations always; real ones (and action masks) when the environment is known."""
    rolls = [random_rollout(engine.spec, cfg.steps, cfg.envs, cfg.reset_prob, cfg.seed)]
    env_cfg, note = real_env_config(Path(cfg.policy_dir), engine.spec)
    if env_cfg is not None:
        try:
            rolls.append(env_rollout(env_cfg, engine, cfg.steps, cfg.envs, cfg.reset_prob, cfg.seed))
            note = f"verified on random and on real {rolls[-1].source} observations ({note})"
        except Exception as e:  # a broken env must not block exporting; say so in the report
            note = f"{note}, but stepping it failed ({type(e).__name__}: {e}); random observations only"
    return rolls, [note]


def export_policy(cfg: ExportConfig) -> ExportReport:
    """Run the export described by `cfg` (see module doc). Never raises for a failed verification:
    check `report.ok` (the CLI exits non-zero). Raises ExportError/ArtifactError for bad input."""
    if cfg.peft:
        from .peft_export import export_peft  # (it imports this module's result types)
        return export_peft(cfg)
    torch.manual_seed(cfg.seed)
    engine = Engine.from_dir(cfg.policy_dir, device="cpu", mode="lora")
    agents, formats = check_config(cfg, engine)
    rollouts, notes = load_rollouts(cfg, engine)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create --out {out} ({e.strerror}): pass a writable directory") from None
    earlier = _earlier_artifacts(out, engine)  # refuses an --out holding another policy's export
    atomic_write(out / SPEC_FILE, engine.spec.to_json().encode())
    tasks = [(a, f) for a in agents for f in formats] if cfg.merge else [(MULTI_AGENT, "onnx")]
    results = []
    with tqdm(tasks, desc="export", unit="artifact", disable=not cfg.progress) as bar:
        for agent, kind in bar:
            bar.set_postfix_str(f"{agent} {kind}")
            results.append(_one(cfg, engine, rollouts, agent, kind, out))
    report = ExportReport(out, results, notes)
    _write_manifest(cfg, engine, report, earlier)
    return report


def _earlier_artifacts(out: Path, engine: Engine) -> list[dict]:
    """Exports are additive: the artifacts an earlier export of the same policy (same backbone
    fingerprint and adapter versions) wrote into `out` stay listed unless re-exported now. An `out`
    holding an export of another policy is refused (ExportError) before anything is written."""
    try:
        old = contract.read_manifest(out)
    except LorasaError:
        return []  # no (readable) manifest: nothing earlier to keep
    same = (old.get("backbone_fingerprint") == engine.spec.backbone_fingerprint
            and old.get("adapter_versions") == engine.versions())
    if not same:
        raise ExportError(f"--out {out} holds an export of another policy (or other adapter versions): pass "
                          "an empty directory, or remove that export first")
    arts = old.get("artifacts", [])
    return [a for a in arts if isinstance(a, dict) and a.get("error") is None
            and all((out / f).exists() for f in a.get("files", []))]


def _one(cfg: ExportConfig, engine: Engine, rollouts: list[ObsRollout], agent: str, kind: str,
         out: Path) -> ArtifactResult:
    t0 = time.perf_counter()
    final = out / (contract.MERGED_DIR / Path(agent) if kind == "safetensors" else contract.graph_file(agent))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        diff = _build_and_verify(cfg, engine, rollouts, agent, kind, tmp)
        staged = tmp if kind == "safetensors" else tmp / final.name
        if staged.is_dir():  # mkdtemp's private 0700 would become the published directory's mode
            os.chmod(staged, default_mode(directory=True))
        _publish(staged, final)
        files = sorted(str(p.relative_to(out)) for p in ([final] if final.is_file() else final.iterdir()))
        size = sum((out / f).stat().st_size for f in files)
        sums = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}
        return ArtifactResult(agent, kind, files, size, diff, time.perf_counter() - t0, sha256=sums)
    except (LorasaError, RuntimeError) as e:
        if final.exists():  # a file from an earlier run was not verified against this policy
            _remove(final)
        log.error("%s", e)
        diff = e.max_diff if isinstance(e, VerificationError) else None
        return ArtifactResult(agent, kind, [], 0, diff, time.perf_counter() - t0, str(e))
    finally:
        _remove(tmp)


def _build_and_verify(cfg: ExportConfig, engine: Engine, rollouts: list[ObsRollout], agent: str,
                      kind: str, tmp: Path) -> float:
    """Write the artifact under `tmp`, then verify it over every rollout -> max abs diff."""
    spec, worst = engine.spec, 0.0
    if kind == "safetensors":
        merged_mod.write_merged(engine, agent, tmp)
        cand_engine = Engine.from_dir(tmp, device="cpu")
        rows = agent_rows(engine, agent, cfg.envs)
        width = spec.agent(agent).act_dim
        cand, ref = engine_step(cand_engine, rows, width, "auto"), engine_step(engine, rows, width, "merged")
        name = f"merged/{agent}"
    else:
        data, rows, width, index, ref_mode = _onnx(cfg, engine, agent)
        name = contract.graph_file(agent)
        written = tmp / name.name
        written.write_bytes(data)
        cand = onnx_step(written, output_names(spec), index)  # the file as written, reloaded
        ref = engine_step(engine, rows, width, ref_mode)
        name = str(name)
    for k, roll in enumerate(rollouts):
        worst = max(worst, rollout_parity(name, cand, ref, engine, rows, width, roll, cfg.verify,
                                          cfg.seed + k))
    return worst


def _onnx(cfg: ExportConfig, engine: Engine, agent: str):
    """-> (model bytes, rows, act width, agent_index feed or None, engine mode to compare with)."""
    spec, B = engine.spec, EXAMPLE_BATCH
    g = torch.Generator().manual_seed(cfg.seed)
    rec = [torch.zeros(B, spec.hidden), torch.tensor([True, False, False])] if spec.recurrent else []
    multi = agent == MULTI_AGENT
    meta = {contract.META_SPEC: spec.to_json(), contract.META_INPUTS: json.dumps(input_names(spec, multi)),
            contract.META_OUTPUTS: json.dumps(output_names(spec))}
    if multi:
        module = MultiAgentActor(spec, engine.backbone(), {a: engine.adapter(a) for a in spec.agent_ids},
                                 cfg.lora_impl)
        example = [torch.arange(B) % len(spec.agents), torch.randn(B, spec.obs_max, generator=g)] + rec
        width, rows, mode = spec.act_max, mixed_rows(engine, cfg.envs, cfg.seed), "lora"
        meta[contract.META_LORA_IMPL] = module.impl
    else:
        ag = spec.agent(agent)
        module = MergedAgentActor(spec, ag, engine.backbone(), engine.merged_weights(agent),
                                  engine.log_std(agent) if spec.action == "gaussian" else None)
        example = [torch.randn(B, ag.obs_dim, generator=g)] + rec
        width, rows, mode = ag.act_dim, agent_rows(engine, agent, cfg.envs), "merged"
        meta[contract.META_AGENT] = json.dumps(asdict(ag))
    if spec.action == "categorical":
        example.append(torch.ones(B, width, dtype=torch.bool))
    data = export_bytes(module, tuple(example), input_names(spec, multi), output_names(spec),
                        cfg.opset, meta)
    index = engine.agent_index(rows.agent_ids) if multi else None
    return data, rows, width, index, mode


def _publish(staged: Path, final: Path) -> None:
    """Rename into place; a directory replaces an older one via a side name."""
    if staged.is_file() or not final.exists():
        staged.replace(final)
        return
    old = final.with_name(f".{final.name}.old")
    _remove(old)
    final.replace(old)
    staged.replace(final)
    _remove(old)


def _kept(earlier: list[dict], report: ExportReport) -> list[dict]:
    """Earlier artifacts not re-exported by this run (same agent and kind)."""
    now = {(r.agent, r.kind) for r in report.results}
    return [a for a in earlier if (a.get("agent"), a.get("kind")) not in now]


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _manifest_log_std(engine: Engine) -> list | None:
    """The Gaussian log-std for manifest.json: [act_max] shared, or [n_agents][act_max] (spec agent
    order) when the adapters carry per-agent offsets (lorasa_serve.onnx_contract.manifest_log_std)."""
    spec = engine.spec
    if spec.action != "gaussian":
        return None
    if not spec.lora.log_std_offset:
        return np.asarray(engine.backbone()["log_std"].cpu(), dtype=np.float32).tolist()
    return [np.asarray(engine.log_std(a).cpu(), dtype=np.float32).tolist() for a in spec.agent_ids]


def _write_manifest(cfg: ExportConfig, engine: Engine, report: ExportReport, earlier: list[dict] = ()) -> None:
    spec = engine.spec
    manifest = {
        "source": str(Path(cfg.policy_dir).resolve()),
        "backbone_fingerprint": spec.backbone_fingerprint,
        "adapter_versions": engine.versions(),
        "merge": cfg.merge, "opset": cfg.opset, "torch": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=True); GRU as explicit ops (PyTorch linear_before_reset)",
        "onnx_inputs": {"per_agent": input_names(spec, False), "multi_agent": input_names(spec, True)},
        "onnx_outputs": output_names(spec),
        "log_std": _manifest_log_std(engine),
        "verification": {"tol": cfg.verify.tol, "steps": cfg.steps, "envs": cfg.envs,
                         "observations": sorted({n for n in report.notes})},
        "artifacts": _kept(earlier, report) + [asdict(r) for r in report.results],
    }
    contract.write_manifest(report.out, manifest)
