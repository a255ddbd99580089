"""The ONNX export contract, owned by the runtime: graph input/output names, file layout, manifest.

The exporters (`exporters/`) write exactly this; `OnnxEngine` reads it, by name. Layout of an
export directory:

    policy.json              the source spec (all agents)
    manifest.json            what was exported (see `write_manifest`); `artifacts` lists each file with
                             its verification result and sha256; `log_std` the Gaussian log-std [act_max] (or [n_agents, act_max])
    onnx/<agent_id>.onnx     per-agent graph, merged weights, inputs/outputs at the agent's true sizes
    onnx/multi_agent.onnx    one graph for every agent: input `agent_index`, stacked adapters
    merged/<agent_id>/       per-agent merged policy directory (safetensors)

Graph inputs (B is dynamic): [agent_index [B] int64,] obs [B, obs], state [B, H] and reset [B] bool
(recurrent), avail [B, act] bool (Categorical). Outputs: Gaussian action, mean, log_std [B, act];
Categorical action [B] int64, logits [B, act] (unavailable at float32 min); recurrent state_out [B, H].
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .artifacts import SPEC_FILE, atomic_write
from .errors import CorruptFileError, NotRegularFileError
from .files import read_file
from .spec import PolicySpec

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
MERGED_DIR = "merged"
MULTI_AGENT = "*"  # the manifest's agent for the multi-agent graph
MULTI_STEM = "multi_agent"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is read only if it is at most this big

# graph input names
AGENT_INDEX, OBS, STATE, RESET, AVAIL = "agent_index", "obs", "state", "reset", "avail"
# graph output names
ACTION, MEAN, LOG_STD, LOGITS, STATE_OUT = "action", "mean", "log_std", "logits", "state_out"
# ModelProto metadata_props keys
META_SPEC, META_INPUTS, META_OUTPUTS = "lorasa.spec", "lorasa.inputs", "lorasa.outputs"
META_AGENT, META_LORA_IMPL = "lorasa.agent", "lorasa.lora_impl"

__all__ = ["SPEC_FILE", "MANIFEST", "input_names", "output_names", "head_output", "graph_file",
           "read_manifest", "write_manifest", "verified_graphs", "recorded_digest", "manifest_log_std"]


def input_names(spec: PolicySpec, multi_agent: bool) -> list[str]:
    names = ([AGENT_INDEX] if multi_agent else []) + [OBS]
    if spec.recurrent:
        names += [STATE, RESET]
    if spec.action == "categorical":
        names.append(AVAIL)
    return names


def output_names(spec: PolicySpec) -> list[str]:
    names = [ACTION, MEAN, LOG_STD] if spec.action == "gaussian" else [ACTION, LOGITS]
    return names + ([STATE_OUT] if spec.recurrent else [])


def head_output(spec: PolicySpec) -> str:
    """The output holding the raw head: Gaussian means or masked logits."""
    return MEAN if spec.action == "gaussian" else LOGITS


def graph_file(agent: str) -> Path:
    """Relative path of an agent's graph, or of the multi-agent graph for `MULTI_AGENT`."""
    return Path(ONNX_DIR) / f"{MULTI_STEM if agent == MULTI_AGENT else agent}.onnx"


def write_manifest(out: Path, manifest: dict) -> None:
    """Atomically write `out/manifest.json`. Keys the runtime reads: `artifacts` (a list of
    {"agent", "kind", "files", "error", "sha256": {file: hex}, ...}) and `log_std` (Gaussian: act_max
    floats, or one list of them per agent when adapters carry log-std offsets; else None)."""
    atomic_write(Path(out) / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(d: Path) -> dict:
    """The export's manifest.json (regular file, size bounded: typed errors from `files.read_file`)."""
    path = Path(d) / MANIFEST
    if not os.path.lexists(path):
        raise NotRegularFileError(path, "missing: not an export directory (lorasa-export writes it)")
    try:
        manifest = json.loads(read_file(path, MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(path, f"not JSON ({type(e).__name__}: {str(e)[:200]}): not an export "
                                     "directory") from None
    if not isinstance(manifest, dict):
        raise CorruptFileError(path, "must be a JSON object")
    return manifest


def verified_graphs(manifest: dict) -> set[str]:
    """Agents (or `MULTI_AGENT`) whose ONNX graph the last export verified."""
    arts = manifest.get("artifacts", [])
    return {a.get("agent") for a in arts if isinstance(a, dict)
            and a.get("kind") == "onnx" and a.get("error") is None}


def recorded_digest(manifest: dict, rel: Path) -> str | None:
    """The sha256 the export recorded for file `rel` (relative to the export directory), None when it
    recorded none (an export from before digests): readers check the file's bytes against it."""
    for a in manifest.get("artifacts", []):
        sums = a.get("sha256") if isinstance(a, dict) else None
        if isinstance(sums, dict) and isinstance(sums.get(str(rel)), str):
            return sums[str(rel)]
    return None


def manifest_log_std(d: Path, manifest: dict, spec: PolicySpec) -> np.ndarray:
    """The Gaussian log-std recorded in the manifest: [act_max] shared by every agent, or
    [n_agents, act_max] (spec agent order) when the policy's adapters carry log-std offsets."""
    path = Path(d) / MANIFEST
    try:
        log_std = np.asarray(manifest["log_std"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(path, f"missing or invalid log_std: {e}") from None
    shape = (len(spec.agents), spec.act_max) if spec.lora.log_std_offset else (spec.act_max,)
    if log_std.shape != shape or not np.isfinite(log_std).all():
        raise CorruptFileError(path, f"log_std must be finite floats of shape {list(shape)}, "
                                     f"not {list(log_std.shape)}")
    return log_std
