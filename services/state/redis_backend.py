"""The Redis state backend (LORASA_REDIS_URL): replicas on several hosts share adapters and sessions.

Keys, all under `lorasa:<backbone fingerprint[:16]>:` (two policies can share one Redis):

    ver:<agent>          counter: the agent's last version handed out (first upload: 2; the shipped
                         adapter is 1); the next is max(counter, pub[agent]) + 1, so never a used one
    ad:<agent>:<v>       the adapter's safetensors bytes; written once, before v becomes visible
    ad:<agent>:<v>:sha256  its sha256, written with it; every reader checks the bytes against it
    pub                  hash agent -> newest published version (only ever raised, by a Lua script)
    merged               set of merged agents
    epoch                INCR on every publish; `boot` is a random id set when the keys are seeded
    s:<session>          hash agent -> float32 state row (PEXPIRE = the session TTL)
    sl:<session>         the lease of the step in flight (SET NX PX)
    sidx, sbytes, stotal sessions by last use, bytes per session, total bytes (count/byte bounds)

A worker reads (boot, epoch) with one MGET per batch. `boot` missing means Redis lost its data (a
restart without persistence): every server that had synced with it re-seeds what it serves (counters
raised to its versions, blobs re-stored, never lowered) within about a second (idle workers check once
a second), so versions never go backwards for a client. A process that never synced with this Redis
(a respawned worker, a new replica: it only knows version 1) waits `adapter_sync.SEED_GRACE_S` for them and
seeds it itself only if nobody did (a first deployment, or every old server gone).
Run Redis with `maxmemory-policy noeviction` (or a volatile-* policy: only session keys have a TTL):
an evicted blob, `pub` or `boot` loses adapters.
Single Redis (or a primary with replicas) only, not Redis Cluster: scripts touch keys of several
sessions. Every network call has a 1 s timeout; any connection error is `StateUnavailable`.
"""
from __future__ import annotations

import secrets
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import redis

from lorasa_serve.spec import check_agent_id

from .base import (Published, SessionBusy, SessionLimits, SessionStep, StateConfigError, StateOutcomeUnknown,
                   StateUnavailable, blobs_to_rows, digest, redact, rows_to_blobs, verified)

KEEP_VERSIONS = 3  # adapter blobs kept per agent

# KEYS: pub, epoch, counter; ARGV: agent, version. Raise pub[agent] to version (never lower it).
_PUBLISH = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '1')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local c = tonumber(redis.call('GET', KEYS[3]) or '1')
if tonumber(ARGV[2]) > c then redis.call('SET', KEYS[3], ARGV[2]) end
return redis.call('INCR', KEYS[2])
"""
# KEYS: counter, boot, pub; ARGV: agent. The next version: above both the counter and the published
# version (a counter lost to eviction never hands out a used version), so at least 2 (the shipped
# adapter is version 1); -1 while the keys are not seeded (Redis lost its data, not yet re-seeded).
_NEXT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local c = tonumber(redis.call('GET', KEYS[1]) or '1')
local p = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '1')
local v = math.max(c, p) + 1
redis.call('SET', KEYS[1], v)
return v
"""
# KEYS: lease, state, sidx, sbytes, stotal; ARGV: token, write, ttl_ms, max_bytes, max_sessions, sid,
# key prefix, then agent/blob pairs. -> 1 written, 0 lease lost. Over a bound, the least recently used
# sessions are dropped, except this one and any whose step is in flight (its lease `sl:` exists).
_CLOSE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '1' then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local n = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do n = n + #v end
local old = tonumber(redis.call('HGET', KEYS[4], ARGV[6]) or '0')
redis.call('HSET', KEYS[4], ARGV[6], n)
redis.call('INCRBY', KEYS[5], n - old)
redis.call('ZADD', KEYS[3], now, ARGV[6])
local function drop(sid)
  local b = tonumber(redis.call('HGET', KEYS[4], sid) or '0')
  if b > 0 then redis.call('INCRBY', KEYS[5], -b) end  -- (never '-0')
  redis.call('HDEL', KEYS[4], sid)
  redis.call('ZREM', KEYS[3], sid)
  redis.call('DEL', ARGV[7] .. 's:' .. sid)
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))) do drop(sid) end
local function over()
  return redis.call('ZCARD', KEYS[3]) > tonumber(ARGV[5])
      or tonumber(redis.call('GET', KEYS[5]) or '0') > tonumber(ARGV[4])
end
local kept = 0  -- sessions skipped so far: the next candidates start after them
while over() do
  local batch = redis.call('ZRANGE', KEYS[3], kept, kept + 63)
  if #batch == 0 then break end
  for _, sid in ipairs(batch) do
    if not over() then break end
    if sid ~= ARGV[6] and redis.call('EXISTS', ARGV[7] .. 'sl:' .. sid) == 0 then drop(sid) else kept = kept + 1 end
  end
end
return 1
"""
# KEYS: state, lease, sidx, sbytes, stotal; ARGV: sid. Forget a session (and any step's lease) -> existed.
_RESET = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
local b = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if b > 0 then redis.call('INCRBY', KEYS[5], -b) end  -- (never '-0')
return existed
"""


class RedisState:
    local_check = False  # generation() is a network round trip (it may stall)

    def __init__(self, url: str, fingerprint: str, hidden: int, limits: SessionLimits,
                 timeout_s: float = 1.0):
        if urlsplit(url).scheme not in ("redis", "rediss"):
            raise StateConfigError(f"LORASA_REDIS_URL must be redis://... or rediss://..., not {redact(url)}")
        self.description = f"redis {redact(url)}"
        self.hidden, self.limits = hidden, limits
        self.p = f"lorasa:{fingerprint[:16]}:"
        self._r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry_on_timeout=False)
        self._next = self._r.register_script(_NEXT)
        self._publish = self._r.register_script(_PUBLISH)
        self._close = self._r.register_script(_CLOSE)
        self._reset = self._r.register_script(_RESET)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StateUnavailable(f"{self.description} unreachable: {type(e).__name__}") from None
        except redis.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e) or "LOADING" in str(e):
                raise StateUnavailable(f"{self.description}: {e}") from None
            raise

    # --- adapters -------------------------------------------------------------------------------
    def generation(self) -> tuple:
        return tuple(self._call(self._r.mget, self.p + "boot", self.p + "epoch"))

    def published(self) -> Published:
        def read(pipe):
            pipe.exists(self.p + "boot").hgetall(self.p + "pub").smembers(self.p + "merged")
            return pipe.execute()
        boot, pub, merged = self._call(read, self._r.pipeline(transaction=True))
        return Published({k.decode(): int(v) for k, v in pub.items()}, frozenset(m.decode() for m in merged),
                         lost=not boot)

    def adapter_blob(self, agent_id: str, version: int) -> bytes:
        key = f"{self.p}ad:{agent_id}:{version}"
        data, want = self._call(self._r.mget, key, key + ":sha256")
        if data is None:  # pruned by newer uploads since `published()`: the next check reads again
            raise KeyError(f"adapter {agent_id!r} v{version} is no longer in {self.description}")
        return verified(data, want.decode() if want else None, f"{self.description} {key}")

    def _store_blob(self, agent_id: str, version: int, data: bytes) -> None:
        """The blob and its sha256 (checked by every reader), stored before the version is visible."""
        key = f"{self.p}ad:{agent_id}:{version}"
        self._call(self._r.mset, {key: data, key + ":sha256": digest(data)})

    def publish_adapter(self, agent_id: str, data: bytes) -> int:
        """A failure before the publishing script was sent is StateUnavailable (nothing became visible:
        safe to retry); once it was sent, a lost answer is StateOutcomeUnknown: a stalled Redis runs
        the script when it resumes, so the version may go live after the caller was told of the error."""
        check_agent_id(agent_id)
        version = int(self._call(self._next, [f"{self.p}ver:{agent_id}", self.p + "boot", self.p + "pub"],
                                 [agent_id]))
        if version < 0:
            raise StateUnavailable(f"{self.description} lost its data; servers are re-seeding it, retry")
        self._store_blob(agent_id, version, data)
        try:
            self._call(self._publish, [self.p + "pub", self.p + "epoch", f"{self.p}ver:{agent_id}"],
                       [agent_id, version])
        except StateUnavailable as e:
            raise StateOutcomeUnknown(f"adapter v{version} of {agent_id!r} may or may not have been published "
                                      f"(it goes live if {self.description} ran the request before it "
                                      f"failed, or runs it when it resumes): {e}") from None
        self._prune(agent_id, version)
        return version

    def _prune(self, agent_id: str, version: int) -> None:
        """Delete the blobs older than the KEEP_VERSIONS newest (best effort: the upload is published,
        a failure here only leaves old blobs, which the next upload's pruning deletes)."""
        old = [f"{self.p}ad:{agent_id}:{v}{suffix}" for v in range(max(1, version - 2 * KEEP_VERSIONS),
                                                                      version - KEEP_VERSIONS + 1)
               for suffix in ("", ":sha256")]
        if old:
            try:
                self._call(self._r.delete, *old)
            except StateUnavailable:
                pass

    def publish_merged(self, agent_ids: list[str], merge: bool) -> tuple[str, ...]:
        """A lost answer to the MULTI/EXEC is StateOutcomeUnknown (a stalled Redis runs it when it resumes)."""
        if self.published().lost:
            raise StateUnavailable(f"{self.description} lost its data; servers are re-seeding it, retry")

        def run(pipe):
            if agent_ids:
                (pipe.sadd if merge else pipe.srem)(self.p + "merged", *agent_ids)
            pipe.incr(self.p + "epoch").smembers(self.p + "merged")
            return pipe.execute()[-1]
        try:
            merged = self._call(run, self._r.pipeline(transaction=True))
        except StateUnavailable as e:
            raise StateOutcomeUnknown(f"the {'merge' if merge else 'unmerge'} of {agent_ids} may or may not have "
                                      f"been applied (if {self.description} ran it, or runs it when it "
                                      f"resumes): {e}") from None
        return tuple(sorted(m.decode() for m in merged))

    def reseed(self, versions: dict[str, int], blob: Callable[[str], bytes], merged: set[str]) -> None:
        pub = self.published()
        for agent, v in versions.items():
            if v > pub.version(agent):
                self._store_blob(agent, v, blob(agent))
                self._call(self._publish, [self.p + "pub", self.p + "epoch", f"{self.p}ver:{agent}"],
                           [agent, v])
        if pub.lost:
            def run(pipe):
                if merged:
                    pipe.sadd(self.p + "merged", *sorted(merged))
                pipe.set(self.p + "boot", secrets.token_hex(8), nx=True).incr(self.p + "epoch")
                return pipe.execute()
            self._call(run, self._r.pipeline(transaction=True))

    # --- sessions -------------------------------------------------------------------------------
    def open_steps(self, items: list[tuple[str, list[str]]]) -> list[SessionStep | SessionBusy]:
        tokens = [secrets.token_hex(8) for _ in items]

        def run(pipe):
            for (sid, _), tok in zip(items, tokens):
                pipe.set(f"{self.p}sl:{sid}", tok, nx=True, px=int(self.limits.lease_s * 1000))
                pipe.hgetall(f"{self.p}s:{sid}")
            return pipe.execute()
        res = self._call(run, self._r.pipeline(transaction=False))
        out = []
        for k, ((sid, agents), tok) in enumerate(zip(items, tokens)):
            if not res[2 * k]:
                out.append(SessionBusy(f"session {sid!r} has another step in flight"))
                continue
            blobs = {a.decode(): b for a, b in res[2 * k + 1].items()}
            out.append(SessionStep(sid, agents, tok, *blobs_to_rows(agents, blobs, self.hidden),
                                       resumed=bool(blobs)))
        return out

    def close_steps(self, steps: list[tuple[SessionStep, np.ndarray | None]]) -> list[bool]:
        def run(pipe):
            for step, state in steps:
                sid = step.session_id
                blobs = rows_to_blobs(step.agent_ids, state) if state is not None else []
                pairs = [x for agent_blob in blobs for x in agent_blob]
                self._close(keys=[f"{self.p}sl:{sid}", f"{self.p}s:{sid}", self.p + "sidx", self.p + "sbytes",
                                  self.p + "stotal"],
                            args=[step.token, int(state is not None), int(self.limits.ttl_s * 1000),
                                  self.limits.max_bytes, self.limits.max_sessions, sid, self.p, *pairs],
                            client=pipe)
            return pipe.execute()
        return [bool(r) for r in self._call(run, self._r.pipeline(transaction=False))] if steps else []

    def reset_session(self, session_id: str) -> bool:
        p = self.p
        return bool(self._call(self._reset, [f"{p}s:{session_id}", f"{p}sl:{session_id}", p + "sidx",
                                             p + "sbytes", p + "stotal"], [session_id]))

    def session_stats(self) -> dict[str, int]:
        def run(pipe):
            return pipe.zcard(self.p + "sidx").get(self.p + "stotal").execute()
        n, total = self._call(run, self._r.pipeline(transaction=False))
        return {"sessions": int(n), "bytes": int(total or 0)}

    def close(self) -> None:
        self._r.close()
