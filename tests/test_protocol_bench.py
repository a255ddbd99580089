"""benchmarks/protocol_bench.py without a server: its payloads are valid requests for every protocol, the
per-request pieces it times run on both benchmark policies, and the goals are computed from the cells."""
from pathlib import Path

import numpy as np
import pytest

from conftest import require_extra

require_extra("serve", "starlette")

from lorasa_serve import Engine  # noqa: E402
from lorasa_serve.oip_codec import encode  # noqa: E402
from services.oip import parse_infer  # noqa: E402
from benchmarks.protocol_bench import _v2_tensors, goals, payload, smax_policy, time_pieces  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "policies" / "halfcheetah_2x3"


@pytest.fixture(scope="module", params=["shipped", "smax3s5z"])
def spec(request, tmp_path_factory):
    path = SHIPPED if request.param == "shipped" else \
        smax_policy(tmp_path_factory.mktemp("smax") / "policy")
    return Engine.from_dir(path).spec


@pytest.mark.parametrize("rows", [2, 64])
def test_pieces_run_and_binary_bodies_are_smaller(spec, rows):
    p = time_pieces(spec, spec.to_dict(), rows, 1)
    assert p["rows"] == rows
    for key in ("v1_parse_ms", "v1_encode_ms", "v2_json_parse_ms", "v2_json_encode_ms", "v2_binary_parse_ms",
                "v2_binary_encode_ms"):
        assert p[key] > 0
    assert p["bytes"]["v2_binary"] < p["bytes"]["v2_json"] and p["bytes"]["v2_binary"] < p["bytes"]["v1"]


def test_payload_is_a_valid_request_with_the_same_rows_in_json_and_binary(spec):
    p = payload(spec.to_dict(), 33, seed=3)
    reqs = []
    for binary in (False, True):
        body, hl = encode({}, "inputs", _v2_tensors(p, binary))
        reqs.append(parse_infer(body, None if hl is None else str(hl), spec, 1024).req)
    for r in reqs:
        assert r.agent_ids == p["ids"]
        np.testing.assert_array_equal(r.obs, p["obs"])
        np.testing.assert_array_equal(r.idx, p["index"])


def _cell(policy, rows, clients, inproc, binary_rows_per_s, binary_p50=1.0):
    cell = {"policy": policy, "rows": rows, "clients": clients,
            "inproc": {"rows_per_s": inproc, "p50_ms": 0.1}}
    for proto in ("v1_json", "v2_json"):
        cell[proto] = {"rows_per_s": binary_rows_per_s / 10, "p50_ms": binary_p50 * 2}
    cell["v2_binary"] = {"rows_per_s": binary_rows_per_s, "p50_ms": binary_p50}
    return cell


def test_goals_are_the_issue_ratios():
    results = [_cell("a", 2, 1, 10_000, 800, binary_p50=0.7), _cell("a", 512, 1, 300_000, 99_000),
               _cell("a", 4096, 1, 300_000, 150_000), _cell("a", 512, 8, 300_000, 1)]
    g = goals(results, {"a": {"p50_ms": 0.5}})["a"]
    assert g["v2_binary_2rows_p50_over_livez"] == 1.4 and g["goal_2rows_within_1.5x_livez"]
    assert g["v2_binary_over_inproc_512rows"] == 0.33 and not g["goal_512rows_at_least_0.33"]  # 0.33 < 1/3
    assert g["v2_binary_over_inproc_4096rows"] == 0.5 and g["goal_4096rows_at_least_0.50"]


def test_the_one_percentile_takes_lists_and_arrays():
    from benchmarks.timing import percentile
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    for v in (values, np.asarray(values)):
        assert percentile(v, 50) == 3.0 and percentile(v, 0) == 1.0 and percentile(v, 100) == 5.0
    with pytest.raises(ValueError):
        percentile(np.asarray([]), 50)
