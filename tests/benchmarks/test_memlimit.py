"""The limit runner's child-process protocol (benchmarks/memlimit.py) on tiny stdlib-only functions."""
from __future__ import annotations

import pytest

from hetmem.benchmarks import memlimit

TARGETS = "tests.benchmarks.memlimit_targets"
MiB = 1 << 20


def test_result_comes_back_with_the_childs_peak_rss():
    result = memlimit.run_limited(TARGETS, "touch", {"nbytes": 64 * MiB}, limit_bytes=None, timeout_s=60)
    assert result["ok"] and result["outcome"] == "ok", result
    assert result["first"] == 1 and result["nbytes"] == 64 * MiB
    assert result["peak_rss_bytes"] >= 64 * MiB
    assert result["limit"]["kind"] == "none"


def test_an_error_in_the_child_is_reported_not_raised():
    result = memlimit.run_limited(TARGETS, "fail", {}, limit_bytes=None, timeout_s=60)
    assert not result["ok"] and result["outcome"] == "error"
    assert "ValueError: bad key 'x'" in result["error"]


def test_torch_out_of_memory_message_counts_as_out_of_memory():
    result = memlimit.run_limited(TARGETS, "no_memory", {}, limit_bytes=None, timeout_s=60)
    assert not result["ok"] and result["outcome"] == "out_of_memory", result


@pytest.mark.parametrize("prefer", ["cgroup", "rlimit"])
def test_over_the_limit_is_out_of_memory_under_it_is_ok(prefer):
    small = memlimit.run_limited(TARGETS, "touch", {"nbytes": 32 * MiB}, limit_bytes=256 * MiB, timeout_s=60,
                                 prefer=prefer)
    big = memlimit.run_limited(TARGETS, "touch", {"nbytes": 512 * MiB}, limit_bytes=256 * MiB, timeout_s=60,
                               prefer=prefer)
    assert small["ok"], small
    assert small["peak_rss_bytes"] >= 32 * MiB
    assert big["outcome"] == "out_of_memory" and not big["ok"], big
    assert small["limit"]["bytes"] == big["limit"]["bytes"] == 256 * MiB
    if prefer == "rlimit":
        assert big["limit"]["kind"] == "rlimit_as"
    else:
        assert big["limit"]["kind"] in ("cgroup1", "cgroup2", "rlimit_as")  # rlimit_as: no writable cgroup here
    if big["limit"]["kind"].startswith("cgroup"):
        assert small["cgroup_peak_bytes"] <= 256 * MiB


def test_parse_child_output_cases():
    line = memlimit.RESULT_MARK + '{"outcome": "ok", "x": 1}'
    assert memlimit.parse_child_output("noise\n" + line + "\n", "", 0) == {"outcome": "ok", "x": 1, "ok": True}
    killed = memlimit.parse_child_output("", "Killed", -9)
    assert killed["outcome"] == "out_of_memory" and not killed["ok"]
    assert memlimit.parse_child_output("", "", None)["outcome"] == "timeout"
    assert memlimit.parse_child_output("", "boom", 3)["outcome"] == "error"


def test_a_child_past_its_time_is_a_timeout():
    result = memlimit.run_limited(TARGETS, "sleep", {"seconds": 30}, limit_bytes=None, timeout_s=1)
    assert result["outcome"] == "timeout" and not result["ok"]


def test_an_unknown_limit_kind_is_refused_by_name():
    with pytest.raises(ValueError, match=r"prefer='cgroups' is not a limit kind; use one of cgroup, rlimit"):
        memlimit.make_limit(1 << 30, prefer="cgroups")
