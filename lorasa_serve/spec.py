"""Policy spec: typed dataclasses, serialised to `policy.json`.

The spec is the contract between training, serving and exporters. Every tensor name and shape of a
backbone follows from it (`backbone_shapes`); an adapter's from it and `lorasa_serve.adapter_layout`
(`adapter_shapes`, the one home of the adapter layout).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from .errors import CorruptFileError, FormatVersionError, SpecError
from . import strict_json
from .files import read_file

FORMAT_VERSION = 1
MAX_SPEC_BYTES = 1 << 20  # policy.json is a few KB
MAX_SIZE = 1 << 20  # any layer width, observation or action size, rank
ActionKind = Literal["gaussian", "categorical"]
Activation = Literal["relu", "tanh"]


@dataclass(frozen=True)
class AgentSpec:
    """One agent: its id and its true (unpadded) observation and action sizes."""

    agent_id: str
    obs_dim: int
    act_dim: int  # Gaussian: action dimensions; Categorical: number of discrete actions
    # policies trained with an agent one-hot (PolicySpec.agent_onehot > 0): this agent's column of it.
    # None: its position in PolicySpec.agents (a merged single-agent export keeps its team index)
    onehot_index: int | None = None


@dataclass(frozen=True)
class LoraSpec:
    """Per-agent low-rank adapters: dW = (alpha / rank) * B @ A on each layer in `layers`
    (`lorasa_serve.adapter_layout`: the update, its scaling and every tensor layout)."""

    rank: int = 8
    alpha: float = 8.0
    layers: tuple[str, ...] | None = None  # None: every Linear of the actor
    # Gaussian only: every adapter also carries `log_std_offset` [act_max], added to the backbone's
    # shared `log_std` (the agent's own exploration noise, as the paper's code trains in phase 2).
    # False (policies written before it): the offset is 0, adapters hold only lora_A / lora_B.
    log_std_offset: bool = False


@dataclass(frozen=True)
class PolicySpec:
    agents: tuple[AgentSpec, ...]
    hidden: int = 64
    mlp_depth: int = 3  # Linears in the MLP: fc1 plus (mlp_depth - 1) hidden layers
    recurrent: bool = True  # GRU written as two Linears, gru.x and gru.h (hidden -> 3*hidden)
    activation: Activation = "relu"
    action: ActionKind = "gaussian"
    lora: LoraSpec = field(default_factory=LoraSpec)
    backbone_fingerprint: str = ""  # sha256 of backbone.safetensors tensors, set when saved
    format_version: int = FORMAT_VERSION
    # Backbone input width when it exceeds every agent's obs_dim (a merged single-agent export of a
    # smaller agent of a heterogeneous team: ln_in normalises over the padded width). None: the max.
    obs_width: int | None = None
    # "PS+ID" (the paper's code): the backbone's input is the observation zero-padded to obs_max, then
    # a one-hot of the agent (agent_onehot columns, a 1 at the agent's onehot_index). The runtime
    # appends it itself: clients send the agent's own observation. 0: no one-hot.
    agent_onehot: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes -------------------------------------------------------------------
    @cached_property
    def obs_max(self) -> int:
        return max(max(a.obs_dim for a in self.agents), self.obs_width or 0)

    @cached_property
    def act_max(self) -> int:
        return max(a.act_dim for a in self.agents)

    @property
    def agent_ids(self) -> list[str]:
        return [a.agent_id for a in self.agents]

    @cached_property
    def input_width(self) -> int:
        """The backbone's input width: obs_max, plus the agent one-hot's columns."""
        return self.obs_max + self.agent_onehot

    def onehot_index(self, i: int) -> int:
        """The one-hot column of agent number i (spec order)."""
        a = self.agents[i]
        return i if a.onehot_index is None else a.onehot_index

    def agent(self, agent_id: str) -> AgentSpec:
        for a in self.agents:
            if a.agent_id == agent_id:
                return a
        raise KeyError(agent_id)

    def linear_names(self) -> list[str]:
        """Every Linear of the actor, in forward order."""
        names = [f"mlp.{i}" for i in range(self.mlp_depth)]
        if self.recurrent:
            names += ["gru.x", "gru.h"]
        return names + ["post", "head"]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (in_features, out_features)."""
        H = self.hidden
        shapes = {"mlp.0": (self.input_width, H)}
        shapes.update({f"mlp.{i}": (H, H) for i in range(1, self.mlp_depth)})
        if self.recurrent:
            shapes["gru.x"] = (H, 3 * H)
            shapes["gru.h"] = (H, 3 * H)
        shapes["post"] = (H, H)
        shapes["head"] = (H, self.act_max)
        return shapes

    def norm_names(self) -> list[str]:
        """Every LayerNorm of the actor, name -> normalised size."""
        return list(self.norm_shapes())

    def norm_shapes(self) -> dict[str, int]:
        H = self.hidden
        shapes = {"ln_in": self.input_width}
        shapes.update({f"mlp.{i}.ln": H for i in range(self.mlp_depth)})
        if self.recurrent:
            shapes["gru.ln"] = H
        shapes["post.ln"] = H
        return shapes

    @property
    def adapted_layers(self) -> list[str]:
        names = self.linear_names()
        if self.lora.layers is None:
            return names
        return [n for n in names if n in self.lora.layers]

    def backbone_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape for backbone.safetensors (PyTorch Linear layout [out, in])."""
        out: dict[str, tuple[int, ...]] = {}
        for name, n in self.norm_shapes().items():
            out[f"{name}.weight"] = (n,)
            out[f"{name}.bias"] = (n,)
        for name, (i, o) in self.linear_shapes().items():
            out[f"{name}.weight"] = (o, i)
            out[f"{name}.bias"] = (o,)
        if self.action == "gaussian":
            out["log_std"] = (self.act_max,)
        return out

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        if not self.agents:
            raise SpecError("a policy needs at least one agent")
        self._check_types()
        ids = [a.agent_id for a in self.agents]
        if len(set(ids)) != len(ids):
            raise SpecError(f"duplicate agent ids in {ids}")
        for a in self.agents:
            check_agent_id(a.agent_id)
            if a.obs_dim < 1 or a.act_dim < 1:
                raise SpecError(f"agent {a.agent_id!r}: obs_dim and act_dim must be >= 1")
        if self.hidden < 1 or self.mlp_depth < 1:
            raise SpecError("hidden and mlp_depth must be >= 1")
        if self.action not in ("gaussian", "categorical"):
            raise SpecError(f"action must be 'gaussian' or 'categorical', not {self.action!r}")
        if self.activation not in ("relu", "tanh"):
            raise SpecError(f"activation must be 'relu' or 'tanh', not {self.activation!r}")
        if self.obs_width is not None and (not isinstance(self.obs_width, int) or self.obs_width < 1):
            raise SpecError(f"obs_width must be a positive int or null, not {self.obs_width!r}")
        if self.lora.rank < 1 or not self.lora.alpha > 0:
            raise SpecError("lora rank must be >= 1 and alpha > 0")
        if not isinstance(self.agent_onehot, int) or isinstance(self.agent_onehot, bool) or self.agent_onehot < 0:
            raise SpecError(f"agent_onehot must be an int >= 0, not {self.agent_onehot!r}")
        if self.agent_onehot:
            cols = [self.onehot_index(i) for i in range(len(self.agents))]
            if any(not isinstance(c, int) or not 0 <= c < self.agent_onehot for c in cols) or len(set(cols)) != len(cols):
                raise SpecError(f"agents' one-hot indices {cols} must be distinct ints in 0 .. {self.agent_onehot - 1} "
                                f"(agent_onehot {self.agent_onehot}): an agent added to a one-hot policy needs "
                                "a free onehot_index")
        elif any(a.onehot_index is not None for a in self.agents):
            raise SpecError("onehot_index is set but agent_onehot is 0")
        if not isinstance(self.lora.log_std_offset, bool):
            raise SpecError(f"lora.log_std_offset must be true or false, not {self.lora.log_std_offset!r}")
        if self.lora.log_std_offset and self.action != "gaussian":
            raise SpecError("lora.log_std_offset needs a Gaussian action head (categorical has no log-std)")
        if self.lora.layers is not None:
            unknown = set(self.lora.layers) - set(self.linear_names())
            if unknown:
                raise SpecError(f"lora.layers names unknown layers {sorted(unknown)}; "
                                f"known: {self.linear_names()}")

    def _check_types(self) -> None:
        """Sizes are ints in [1, MAX_SIZE], flags bools, alpha a finite number (a policy.json of
        strings, floats or 10**400 is a SpecError, not a TypeError deep in a tensor shape)."""
        sizes = [("hidden", self.hidden), ("mlp_depth", self.mlp_depth), ("lora.rank", self.lora.rank)]
        sizes += [(f"agent {a.agent_id!r} {k}", getattr(a, k)) for a in self.agents for k in ("obs_dim", "act_dim")]
        for name, v in sizes:
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
                raise SpecError(f"{name} must be an integer in [1, {MAX_SIZE}], not {str(v)[:40]!r}")
        alpha = self.lora.alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1e30:
            raise SpecError(f"lora.alpha must be a positive finite number, not {str(alpha)[:40]!r}")
        if not isinstance(self.recurrent, bool):
            raise SpecError(f"recurrent must be true or false, not {str(self.recurrent)[:40]!r}")
        if not isinstance(self.backbone_fingerprint, str):
            raise SpecError("backbone_fingerprint must be a string")
        if self.lora.layers is not None and not all(isinstance(x, str) for x in self.lora.layers):
            raise SpecError("lora.layers must be a list of layer names")

    def fits(self, agent: AgentSpec) -> bool:
        """Can this backbone serve `agent` (sizes within the padded maxima)?"""
        return agent.obs_dim <= self.obs_max and agent.act_dim <= self.act_max

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        # keys at their defaults are left out: policies without them keep exactly the version-1 keys
        d["agents"] = [{k: v for k, v in asdict(a).items() if k != "onehot_index" or v is not None}
                       for a in self.agents]
        if not self.agent_onehot:
            del d["agent_onehot"]
        d["lora"]["layers"] = None if self.lora.layers is None else list(self.lora.layers)
        if d["obs_width"] is None:  # policies without it keep exactly the version-1 keys
            del d["obs_width"]
        if not self.lora.log_std_offset:  # likewise: adapters without offsets write no new key
            del d["lora"]["log_std_offset"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "PolicySpec":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(source, f"format_version {version!r} is not supported "
                                             f"(this runtime reads {FORMAT_VERSION})")
        try:
            lora = dict(d.get("lora") or {})
            if lora.get("layers") is not None:
                lora["layers"] = tuple(lora["layers"])
            agents = tuple(AgentSpec(**a) for a in d["agents"])
            rest = {k: v for k, v in d.items() if k not in ("agents", "lora")}
            return cls(agents=agents, lora=LoraSpec(**lora), **rest)
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None
        except (TypeError, KeyError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            raise CorruptFileError(source, f"invalid policy spec: {type(e).__name__}: {str(e)[:200]}") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<json>") -> "PolicySpec":
        try:
            d = strict_json.loads(text)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, duplicate keys, nested too deep
            raise CorruptFileError(source, f"not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(d, dict):
            raise CorruptFileError(source, "policy spec must be a JSON object")
        return cls.from_dict(d, source)

    @classmethod
    def load(cls, path: str | Path) -> "PolicySpec":
        path = Path(path)
        return cls.from_json(read_file(path, MAX_SPEC_BYTES), str(path))

    def with_agents(self, agents: tuple[AgentSpec, ...]) -> "PolicySpec":
        return replace(self, agents=agents)


def check_agent_id(agent_id: str) -> None:
    """Agent ids become file names (adapters/<id>.safetensors): keep them safe."""
    ok = isinstance(agent_id, str) and 0 < len(agent_id) <= 128 and all(
        c.isalnum() or c in "-_." for c in agent_id) and not agent_id.startswith(".")
    if not ok:
        raise SpecError(f"agent id {agent_id!r} must be 1-128 chars of [A-Za-z0-9._-], "
                        "not starting with '.'")
