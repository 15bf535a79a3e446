"""Property: any sequence of engine calls agrees with a plain-PyTorch twin (tests/fuzz/twin.py).

Derandomized (the same examples every run, no example database), so CI is reproducible; a
longer random run: ``python benchmarks/fuzz_engine.py --examples 2000 --json``.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.fuzz.strategies import ops
from tests.fuzz.twin import replay

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=150)
@given(ops(nvme=False))
def test_engine_calls_agree_with_torch(sequence):
    replay(sequence, nvme=False)


@settings(FUZZ, max_examples=100)
@given(ops(nvme=True))
def test_engine_calls_with_nvme_and_io_faults_agree_with_torch(sequence):
    replay(sequence, nvme=True)
