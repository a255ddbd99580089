"""`lorasa-export POLICY --out OUT --peft [--agents a,b]`: one PEFT adapter directory per agent.

    OUT/peft/<agent_id>/adapter_config.json         LoraConfig (r, lora_alpha, target_modules, ...)
    OUT/peft/<agent_id>/adapter_model.safetensors   base_model.model.<layer>.lora_A.weight, ...

`peft.PeftModel.from_pretrained(ActorModule.from_dir(POLICY, agent), OUT/peft/<agent>)` loads it as is
(names: `lorasa_serve.peft_format`). Each directory is written to a temporary name, read back through
the runtime's own PEFT importer (`Engine.load_adapter` takes it), compared with the engine's adapter,
then renamed into place; nothing else in OUT is touched. As the main pipeline, an OUT that holds an
export of another policy (PEFT directories of another backbone, or a manifest.json naming another
policy) is refused before anything is written.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from lorasa_serve import Engine, artifacts, files, peft_format
from lorasa_serve.errors import LorasaError

from .errors import ExportError
from .pipeline import ArtifactResult, ExportConfig, ExportReport, _earlier_artifacts, _publish, _remove

PEFT_DIR = "peft"


def check_peft_config(cfg: ExportConfig, engine: Engine) -> list[str]:
    """-> agents; ExportError before anything is written."""
    if cfg.merge or cfg.formats or cfg.lora_impl != "auto":
        raise ExportError("--peft writes PEFT adapter directories: combine it only with --out and --agents "
                          "(not --merge, --format or --lora-impl)")
    agents = list(cfg.agents) if cfg.agents else engine.agent_ids
    unknown = [a for a in agents if a not in engine.agent_ids]
    if unknown:
        raise ExportError(f"unknown agent(s) {unknown}; the policy has {engine.agent_ids}")
    bare = [a for a in agents if engine.adapter(a) is None]
    if bare:
        raise ExportError(f"agent(s) {bare} have no adapter (a plain policy): nothing to export with --peft")
    if Path(cfg.out).resolve() == Path(cfg.policy_dir).resolve():
        raise ExportError("--out must differ from the policy directory")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ExportError(f"--out {cfg.out} is a file: pass a directory (created if missing)")
    _check_same_policy(Path(cfg.out), engine)
    return agents


def _check_same_policy(out: Path, engine: Engine) -> None:
    """ExportError when `out` holds an export of another policy: a manifest.json naming another
    policy (the main pipeline's check), or a PEFT directory whose config names another backbone."""
    _earlier_artifacts(out, engine)
    want = peft_format.base_model_name(engine.spec)
    for config in sorted((out / PEFT_DIR).glob(f"*/{peft_format.CONFIG_FILE}")):
        try:
            base = json.loads(files.read_file(config, artifacts.MAX_JSON_BYTES)).get("base_model_name_or_path")
        except (LorasaError, ValueError, AttributeError):
            base = None  # unreadable: not ours to judge, and not this policy's either
        if base != want:
            raise ExportError(f"--out {out} holds an export of another policy ({config.parent.relative_to(out)}: "
                              f"{str(base)[:40]!r}): pass an empty directory, or remove that export first")


def export_peft(cfg: ExportConfig) -> ExportReport:
    engine = Engine.from_dir(cfg.policy_dir, device="cpu", mode="lora")
    agents = check_peft_config(cfg, engine)
    root = Path(cfg.out) / PEFT_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create --out {cfg.out} ({e.strerror}): pass a writable directory") from None
    results = [_one(engine, a, root) for a in agents]
    return ExportReport(Path(cfg.out), results, [
        f"PEFT adapters: PeftModel.from_pretrained(ActorModule.from_dir(policy, agent), '{PEFT_DIR}/<agent>')"])


def _one(engine: Engine, agent: str, root: Path) -> ArtifactResult:
    t0 = time.perf_counter()
    final = root / agent
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{agent}.", suffix=".tmp"))
    os.chmod(tmp, artifacts.default_mode(directory=True))  # the usual permissions, not mkdtemp's 0700
    try:
        ours = {k: v.cpu() for k, v in engine.adapter(agent).items()}
        peft_format.save_peft(tmp, engine.spec, agent, ours)
        _, back = peft_format.load_any(tmp, engine.spec, agent)  # the runtime's importer, on the files
        diff = max(float((back[k] - ours[k]).abs().max()) for k in ours)
        if diff != 0.0 or set(back) != set(ours):
            raise ExportError(f"peft/{agent}: tensors read back differ from the engine's by {diff:.3g}")
        _publish(tmp, final)
        files = sorted(f"{PEFT_DIR}/{agent}/{p.name}" for p in final.iterdir())
        size = sum(p.stat().st_size for p in final.iterdir())
        return ArtifactResult(agent, "peft", files, size, diff, time.perf_counter() - t0)
    except LorasaError as e:  # the directory read back wrong: not published
        return ArtifactResult(agent, "peft", [], 0, None, time.perf_counter() - t0, str(e))
    finally:
        _remove(tmp)


__all__ = ["PEFT_DIR", "export_peft"]
