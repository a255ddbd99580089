"""Serve an exported ONNX directory through onnxruntime with the Engine's `act` interface.

    eng = OnnxEngine.from_dir("export/")               # written by `lorasa-export`
    out = eng.act(["agent_0", "agent_1"], obs, state, reset)   # ActOutput, as Engine.act

When the export's manifest lists a verified `onnx/multi_agent.onnx`, that one graph serves mixed
batches natively; otherwise rows are grouped per agent over `onnx/<agent_id>.onnx` (merged weights). The graphs return
raw heads and next states; actions and log-probs come from `lorasa_serve.distributions`, the same
code the Engine uses, so deterministic and seeded sampled actions match the Engine's.

onnxruntime is optional (`pip install 'lorasa-serve[onnx]'`, or `[gpu]` for onnxruntime-gpu).
Providers: "cpu" (default), "auto" (CUDA when onnxruntime lists it, else CPU, logged), or a list.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .distributions import categorical_act, gaussian_act
from .engine import ActOutput
from .errors import ArtifactError, CorruptFileError, InputError, LorasaError, UnknownAgentError
from .spec import PolicySpec

log = logging.getLogger("lorasa_serve.onnx")
MANIFEST = "manifest.json"
SPEC_FILE = "policy.json"
MULTI_GRAPH = "multi_agent.onnx"
GPU_PROVIDERS = ("CUDAExecutionProvider",)


class OnnxRuntimeMissingError(LorasaError, ImportError):
    """onnxruntime is not installed."""


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissingError("the ONNX backend needs onnxruntime: pip install "
                                      "'lorasa-serve[onnx]' (or '[gpu]' for onnxruntime-gpu)") from None
    return onnxruntime


def select_providers(providers: str | Sequence[str] = "cpu") -> list[str]:
    """'cpu' -> CPU; 'auto' -> CUDA first when onnxruntime lists it (logged either way); a list as is."""
    ort = _ort()
    available = ort.get_available_providers()
    if isinstance(providers, str):
        if providers == "cpu":
            return ["CPUExecutionProvider"]
        if providers != "auto":
            raise ValueError(f"providers must be 'cpu', 'auto' or a list, not {providers!r}")
        gpu = [p for p in GPU_PROVIDERS if p in available]
        if gpu:
            log.info("onnxruntime providers: %s then CPU", gpu)
            return gpu + ["CPUExecutionProvider"]
        log.info("no GPU provider in onnxruntime (%s): using CPUExecutionProvider", available)
        return ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"providers {missing} not available; onnxruntime has {available}")
    return list(providers)


def make_session(model: str | Path | bytes, providers: str | Sequence[str] = "cpu",
                 threads: int | None = None):
    """An InferenceSession; logs when a requested provider silently fell back to CPU."""
    ort = _ort()
    wanted = select_providers(providers)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # idle onnxruntime threads otherwise spin for a while after each run, stealing the CPU from
    # whatever runs next in the process (torch, the HTTP server): measured 2-3x slower torch calls
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=wanted)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CorruptFileError(src if isinstance(src, str) else "<onnx bytes>",
                               f"onnxruntime cannot load the model: {e}") from None
    got = sess.get_providers()
    if wanted[0] not in got:
        log.warning("onnxruntime fell back from %s to %s", wanted[0], got)
    return sess


class OnnxEngine:
    """Engine-compatible `act` over exported ONNX graphs (see module doc)."""

    def __init__(self, spec: PolicySpec, sessions: dict[str, object], multi_agent: bool,
                 log_std: np.ndarray | None):
        self.spec = spec
        self.multi_agent = multi_agent
        self._sessions = sessions  # "multi_agent" or agent id -> InferenceSession
        self._slot_of = {a: i for i, a in enumerate(spec.agent_ids)}
        self._obs_dims = np.array([a.obs_dim for a in spec.agents])
        self._act_dims = torch.tensor([a.act_dim for a in spec.agents])
        self._log_std = None if log_std is None else torch.from_numpy(log_std)
        self.device = torch.device("cpu")

    @classmethod
    def from_dir(cls, export_dir: str | Path, providers: str | Sequence[str] = "cpu",
                 threads: int | None = None) -> "OnnxEngine":
        """Serve the graphs that the directory's manifest.json lists as verified by its last export
        (files left by older exports into the same directory are ignored)."""
        d = Path(export_dir)
        spec = PolicySpec.load(d / SPEC_FILE)
        manifest = _manifest(d)
        verified = {a.get("agent") for a in manifest.get("artifacts", [])
                    if a.get("kind") == "onnx" and a.get("error") is None}
        multi = "*" in verified
        if multi:
            files = {"multi_agent": d / "onnx" / MULTI_GRAPH}
        else:
            missing = [a for a in spec.agent_ids if a not in verified]
            if missing:
                raise ArtifactError(d / MANIFEST, f"no verified ONNX graph for agents {missing} "
                                                  f"(export with --format onnx, all agents)")
            files = {a: d / "onnx" / f"{a}.onnx" for a in spec.agent_ids}
        sessions = {k: make_session(f, providers, threads) for k, f in files.items()}
        for f, sess in zip(files.values(), sessions.values()):
            _check_graph_spec(f, sess, spec)
        log_std = _log_std(d, manifest, spec) if spec.action == "gaussian" else None
        return cls(spec, sessions, multi, log_std)

    @classmethod
    def from_policy(cls, policy_dir: str | Path, merge: bool = False, providers: str | Sequence[str] = "cpu",
                    threads: int | None = None, lora_impl: str = "auto") -> "OnnxEngine":
        """Export `policy_dir` (verified, as `lorasa-export`) to a temporary directory and serve it:
        one multi-agent graph, or per-agent merged graphs with `merge=True` (for benchmarks)."""
        import tempfile

        from exporters import ExportConfig, ExportError, export_policy

        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExportConfig(Path(policy_dir), Path(tmp), merge=merge, formats=("onnx",),
                               lora_impl=lora_impl, progress=False)
            report = export_policy(cfg)
            failed = [r.error for r in report.results if r.error]
            if failed:
                raise ExportError(f"export of {policy_dir} failed verification: {failed[0]}")
            return cls.from_dir(tmp, providers, threads)  # sessions hold the models in memory

    @property
    def agent_ids(self) -> list[str]:
        return self.spec.agent_ids

    def agent_index(self, agent_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self._slot_of[a] for a in agent_ids), np.int64, count=len(agent_ids))
        except KeyError as e:
            raise UnknownAgentError(f"unknown agent id {e.args[0]!r}; serving {self.agent_ids}") from None

    # --- acting -------------------------------------------------------------------------------
    def forward(self, agent_ids, obs, state=None, reset=None, avail=None
                ) -> tuple[Tensor, Tensor | None]:
        """Head [B, act_max] (Gaussian means; Categorical logits, unavailable at float32 min) and h'."""
        slots, obs_n, h, reset_n, avail_n = self._inputs(agent_ids, obs, state, reset, avail)
        head, h_next = self._run(slots, obs_n, h, reset_n, avail_n)
        return torch.from_numpy(head), None if h_next is None else torch.from_numpy(h_next)

    def act(self, agent_ids, obs, state=None, reset=None, avail=None, *, deterministic: bool = True,
            generator: torch.Generator | None = None) -> ActOutput:
        slots, obs_n, h, reset_n, avail_n = self._inputs(agent_ids, obs, state, reset, avail)
        head_n, h_next = self._run(slots, obs_n, h, reset_n, avail_n)
        head = torch.from_numpy(head_n)
        dim_mask = torch.arange(self.spec.act_max) < self._act_dims[torch.from_numpy(slots)].unsqueeze(1)
        if self.spec.action == "gaussian":
            actions, logp = gaussian_act(head, self._log_std, dim_mask, deterministic, generator)
        else:
            valid = dim_mask & torch.from_numpy(avail_n)
            actions, logp = categorical_act(head, valid, deterministic, generator)
        return ActOutput(actions, logp, None if h_next is None else torch.from_numpy(h_next))

    def _run(self, slots: np.ndarray, obs: np.ndarray, h: np.ndarray | None, reset: np.ndarray | None,
             avail: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked numpy inputs -> head [B, act_max] float32 (see `forward`), h' [B, H] or None."""
        spec = self.spec
        if self.multi_agent:
            feeds = {"agent_index": slots, "obs": obs}
            return self._call(self._sessions["multi_agent"], feeds, h, reset, avail)
        head = np.zeros((len(slots), spec.act_max), np.float32)
        h_next = None if h is None else np.empty_like(h)
        for s in np.unique(slots):  # one graph call per agent present, rows grouped
            rows = np.flatnonzero(slots == s)
            ag = spec.agents[s]
            sub = [None if x is None else x[rows] for x in (h, reset)]
            av = None if avail is None else avail[rows, :ag.act_dim]
            out, hn = self._call(self._sessions[ag.agent_id], {"obs": obs[rows, :ag.obs_dim]},
                                 sub[0], sub[1], av)
            head[rows, :ag.act_dim] = out
            if hn is not None:
                h_next[rows] = hn
        return head, h_next

    def _call(self, sess, feeds: dict, h, reset, avail) -> tuple[np.ndarray, np.ndarray | None]:
        if self.spec.recurrent:
            feeds["state"], feeds["reset"] = h, reset
        if self.spec.action == "categorical":
            feeds["avail"] = avail
        outs = sess.run(None, feeds)
        head = outs[1]  # "mean" or "logits"
        return head, (outs[-1] if self.spec.recurrent else None)

    # --- input checking (the same rules and errors as Engine) ------------------------------------
    def _inputs(self, agent_ids, obs, state, reset, avail):
        spec = self.spec
        if isinstance(agent_ids, Tensor):
            agent_ids = agent_ids.cpu().numpy()
        if isinstance(agent_ids, np.ndarray) and agent_ids.dtype.kind in "iu":
            slots = agent_ids.astype(np.int64).reshape(-1)
            if len(slots) and (slots.min() < 0 or slots.max() >= len(spec.agents)):
                raise UnknownAgentError(f"agent indices must be in [0, {len(spec.agents)})")
        else:
            if isinstance(agent_ids, (str, bytes)):
                raise InputError("agent_ids must be a sequence of agent ids or an int array")
            slots = self.agent_index(list(agent_ids))
        B = len(slots)
        if B == 0:
            raise InputError("empty batch: agent_ids has no rows")
        obs_n = _float(obs, "obs", B, spec.obs_max, exact=False)
        cols = np.arange(spec.obs_max)
        obs_n = np.where(cols < self._obs_dims[slots][:, None], obs_n, 0.0).astype(np.float32)
        h = reset_n = avail_n = None
        if spec.recurrent:
            h = np.zeros((B, spec.hidden), np.float32) if state is None else \
                _float(state, "state", B, spec.hidden, exact=True)
            reset_n = np.zeros(B, bool) if reset is None else _bool(reset, "reset", (B,))
        if spec.action == "categorical":
            avail_n = np.ones((B, spec.act_max), bool) if avail is None else _bool_padded(avail, B, spec.act_max)
            dim_ok = cols[:spec.act_max] < self._act_dims.numpy()[slots][:, None]
            empty = ~(avail_n & dim_ok).any(1)
            if empty.any():
                raise InputError(f"rows {np.flatnonzero(empty)[:10].tolist()} have no available action "
                                 "(all-zero avail mask)")
        elif avail is not None:
            raise InputError("avail (action masks) only apply to categorical policies")
        return slots, obs_n, h, reset_n, avail_n


def _float(x, name: str, B: int, width: int, exact: bool) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise InputError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if a.ndim != 2 or a.shape[0] != B or a.shape[1] > width or (exact and a.shape[1] != width):
        want = f"[{B}, {width}]" if exact else f"[{B}, <={width}]"
        raise InputError(f"{name} has shape {list(a.shape)}, expected {want}")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or inf")
    if a.shape[1] < width:
        a = np.pad(a, ((0, 0), (0, width - a.shape[1])))
    return np.ascontiguousarray(a)


def _bool(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.dtype != bool:
        if a.dtype.kind not in "fiu" or not np.isin(a, (0, 1)).all():
            raise InputError(f"{name} must hold 0/1 or booleans")
        a = a != 0
    if a.shape != shape:
        raise InputError(f"{name} has shape {list(a.shape)}, expected {list(shape)}")
    return a


def _bool_padded(x, B: int, width: int) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim != 2 or a.shape[0] != B or a.shape[1] > width:
        raise InputError(f"avail has shape {list(a.shape)}, expected [{B}, <={width}]")
    a = _bool(a, "avail", a.shape)
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=False)


def _manifest(d: Path) -> dict:
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(d / MANIFEST, f"missing or not JSON ({e}): not an export directory") from None
    if not isinstance(manifest, dict):
        raise CorruptFileError(d / MANIFEST, "must be a JSON object")
    return manifest


def _check_graph_spec(path: Path, sess, spec: PolicySpec) -> None:
    """The graph must have been exported from this policy's backbone."""
    meta = sess.get_modelmeta().custom_metadata_map.get("lorasa.spec")
    try:
        fp = json.loads(meta)["backbone_fingerprint"] if meta else None
    except (ValueError, KeyError, TypeError):
        fp = None
    if fp != spec.backbone_fingerprint:
        raise ArtifactError(path, f"graph was exported from backbone {str(fp)[:12]!r}, policy.json "
                                  f"names {spec.backbone_fingerprint[:12]!r}")


def _log_std(d: Path, manifest: dict, spec: PolicySpec) -> np.ndarray:
    """The Gaussian log-std [act_max], recorded by the exporter in manifest.json."""
    try:
        log_std = np.asarray(manifest["log_std"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(d / MANIFEST, f"missing or invalid log_std: {e}") from None
    if log_std.shape != (spec.act_max,) or not np.isfinite(log_std).all():
        raise CorruptFileError(d / MANIFEST, f"log_std must be {spec.act_max} finite floats")
    return log_std
