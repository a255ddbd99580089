"""The `/v1/agents` view: per agent its sizes, the version served, its adapter's fingerprint, merged
flags and load error. Read-only over the adapter sync; run as a control job (under the engine lock)."""
from __future__ import annotations

from typing import Mapping

from lorasa_serve import Engine
from lorasa_serve.artifacts import fingerprint
from lorasa_serve.spec import PolicySpec

from .adapter_sync import LoadFailure


class AgentsView:
    def __init__(self, spec: PolicySpec, engine: Engine | None, versions: Mapping[str, int],
                 load_failures: Mapping[str, LoadFailure]):
        """engine: None when the server acts through a backend that cannot swap adapters (no
        fingerprints, nothing merged)."""
        self.spec, self._engine = spec, engine
        self._versions, self._failures = versions, load_failures
        self._fingerprints: dict[str, tuple[int, str]] = {}  # agent -> (version, its adapter's fingerprint)

    def agents(self) -> list[dict]:
        cached = set(self._engine.merged_agents) if self._engine is not None else set()
        pinned = set(self._engine.pinned_agents) if self._engine is not None else set()
        out = []
        for a in self.spec.agents:
            v = self._versions[a.agent_id]
            out.append({"agent_id": a.agent_id, "obs_dim": a.obs_dim, "act_dim": a.act_dim,
                        "version": v, "adapter_fingerprint": self._fingerprint(a.agent_id, v),
                        "merged": a.agent_id in pinned, "auto_merged": a.agent_id in cached - pinned,
                        "load_error": self._load_error(a.agent_id)})
        return out

    def _fingerprint(self, agent_id: str, version: int) -> str:
        """Computed once per version served (a cache of one entry per agent)."""
        cached = self._fingerprints.get(agent_id)
        if cached is None or cached[0] != version:
            ad = self._engine.adapter(agent_id) if self._engine is not None else None
            cached = (version, "" if ad is None else fingerprint({n: t.cpu() for n, t in ad.items()}))
            self._fingerprints[agent_id] = cached
        return cached[1]

    def _load_error(self, agent_id: str) -> dict | None:
        """The published version this worker cannot load for `agent_id` (it serves an older one)."""
        f = self._failures.get(agent_id)
        return None if f is None else {"version": f.version, "error": f.error}
