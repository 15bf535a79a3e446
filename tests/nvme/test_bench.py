"""The benchmark core and `hetmem bench nvme` on tiny sizes: shapes of the results, no leftovers."""
from __future__ import annotations

import json
import os

from hetmem.nvme import load_io_config
from hetmem.nvme.bench import BenchFile, measure_mixed, measure_sequential

MiB = 1 << 20


def test_measure_mixed_reports_both_directions(tmp_path):
    r = measure_mixed(str(tmp_path), total_bytes=32 * MiB, chunk_bytes=4 * MiB, block_size=MiB, queue_depth=4)
    assert r["read_bytes"] > 0 and r["write_bytes"] > 0
    assert r["read_bytes"] + r["write_bytes"] >= 32 * MiB
    assert abs(r["read_bytes_per_s"] + r["write_bytes_per_s"] - r["total_bytes_per_s"]) < 1e-6 * r["total_bytes_per_s"]
    assert r["buffer_kind"].startswith("aligned+prefaulted")  # the IO pool's kind
    assert os.listdir(tmp_path) == []


def test_measure_sequential_moves_the_bytes(tmp_path):
    with BenchFile(str(tmp_path), 16 * MiB, 4 * MiB) as bench:
        assert os.path.getsize(bench.path) == 16 * MiB
        w = measure_sequential(bench.path, "write", total_bytes=16 * MiB, chunk_bytes=4 * MiB, backend="threads")
        r = measure_sequential(bench.path, "read", total_bytes=16 * MiB, chunk_bytes=4 * MiB, backend="threads")
        assert w["bytes"] == r["bytes"] == 16 * MiB and w["bytes_per_s"] > 0 and r["cpu_seconds"] >= 0
        assert w["buffer_kind"] == r["buffer_kind"] and w["buffer_kind"].startswith("aligned+prefaulted")
    assert os.listdir(tmp_path) == []


def test_benchmark_main_json_and_config(tmp_path, capsys):
    from hetmem.benchmarks.nvme_swap import main

    config = tmp_path / "io.json"
    data = tmp_path / "data"
    data.mkdir()
    rc = main(["--dir", str(data), "--total", "16MiB", "--chunk", "4MiB", "--backends", "threads",
               "--block-sizes", "1MiB", "--queue-depths", "2,4", "--threads", "1", "--json",
               "--write-config", str(config)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert {e["queue_depth"] for e in report["results"]} == {2, 4}
    assert set(report["best"]) == {"write", "read"} and report["mixed"]
    assert load_io_config(config) == report["recommended"]
    assert {e["backend"] for e in report["results"]} <= {"threads", "python_threads"}
    assert os.listdir(data) == []
    from hetmem.benchmarks.nvme_swap import format_table

    table = format_table(report)  # every figure names the buffer kind
    kind = f"[{report['buffer_kind']}]"
    figure_lines = [line for line in table.splitlines() if "GB/s" in line]
    assert figure_lines and all(kind in line for line in figure_lines), table
