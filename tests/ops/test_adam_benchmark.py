"""The CPU Adam benchmark runs end to end (tiny size) through `hetmem bench adam`."""
from __future__ import annotations

import json

from hetmem import cli


def test_bench_adam_json(capsys):
    from hetmem.benchmarks.cpu_adam import PROBE_PREFIX, PROBES

    assert cli.main(["bench", "adam", "--params", "300_000", "--threads", "2", "--repeats", "2", "--warmup", "1",
                     "--gap-ms", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["params"] == 300_000 and report["config"]["bytes_per_param"] == 28
    assert report["machine"]["simd_level"] in ("avx512", "avx2", "scalar")
    fp32, mixed = report["results"]["fp32"], report["results"]["mixed_bf16"]
    probes = {PROBE_PREFIX + label for label in PROBES}
    assert len(probes) == 4
    assert set(fp32) == {"hetmem", "torch fused", "torch foreach", "roofline"} | probes
    assert set(mixed) == {"hetmem", "hetmem, out=grad (engine layout)", "torch cast+fused+cast",
                          "torch cast+foreach+cast", "roofline"} | probes
    for rows in (fp32, mixed):
        for row in rows.values():
            assert len(row["times_s"]) == 2 and row["median_s"] > 0
            assert row["gb_per_s"] == 28 * 300_000 / row["median_s"] / 1e9
        # the roofline is the fastest probe: no probe above 100 %, the named one exactly at it
        roofline = rows["roofline"]
        assert roofline["pct_of_roofline"] == 100.0
        assert rows[PROBE_PREFIX + roofline["probe"]]["times_s"] == roofline["times_s"]
        assert all(rows[name]["pct_of_roofline"] <= 100.0 for name in probes)
    assert fp32["torch fused"]["ratio_to_torch_fused"] == 1.0
    assert set(report["targets"]) == {"fp32", "mixed_bf16"}


def test_bench_adam_table(capsys):
    from hetmem.benchmarks import cpu_adam

    assert cpu_adam.main(["--params", "100000", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "torch cast+fused+cast" in out and "% roofline" in out and "target fp32" in out
    assert "roofline fp32: probe: " in out and "roofline mixed_bf16: probe: " in out
