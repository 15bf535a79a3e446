"""``benchmarks/nvme_pipeline_plan.py``'s variant specs: LABEL:CHUNK:DEPTH[:SPILL]."""
from __future__ import annotations

import pytest

from hetmem.benchmarks.nvme_pipeline_plan import parse_variant
from hetmem.nvme.pipeline_plan import SPILL_AHEAD


def test_variants_parse_with_and_without_spill_ahead():
    assert parse_variant("old-depth2:old:2", old=1234) == ("old-depth2", 1234, 2, SPILL_AHEAD)
    assert parse_variant("nospill:auto:auto:0", old=1234) == ("nospill", "auto", "auto", 0)
    assert parse_variant("2M:2097152:1:3", old=1234) == ("2M", 2097152, 1, 3)


@pytest.mark.parametrize("text", ["a:b", "x:auto:auto:0:1", "x:auto:one", "x:auto:auto:two"])
def test_a_bad_variant_names_the_format(text):
    with pytest.raises(ValueError, match=r"LABEL:CHUNK:DEPTH\[:SPILL\]"):
        parse_variant(text, old=1234)


def test_overlapped_steps_get_their_own_optimizer_figures(tmp_path):
    """``--overlap on``: a step's optimizer figures are known once the next backward finishes it;
    ``record`` pairs each row with its own step (none lost, none counted twice)."""
    import hetmem
    from hetmem.benchmarks.nvme_pipeline_plan import record, step
    from tests.engine.helpers import batches, config, pair

    _, model = pair(d_model=128, n_layer=2)
    engine = hetmem.initialize(model, config(device_budget="2MiB", host_budget="8MiB", chunk_size="256KiB",
                                             dtype="bf16", nvme_dir=str(tmp_path), memory_trace=False,
                                             overlap_step=True))
    finished = []  # every step's result, in the order the steps finished
    advance = engine.adam._advance

    def watched(pending, through):
        before = engine.adam.last_result
        advance(pending, through)
        if engine.adam.last_result is not before:
            finished.append(engine.adam.last_result)

    engine.adam._advance = watched
    data, rows = batches(5), []
    record(rows, step(engine, *data[0]))  # the warm-up, finished at once
    for r, (x, y) in enumerate(data[1:]):
        record(rows, step(engine, x, y, finish=r == 3))
    engine.close()
    assert len(finished) == len(rows) == 5
    assert [row["optimizer_s"] for row in rows] == [result.seconds for result in finished]
    assert [row["optimizer_io_wait_s"] for row in rows] == [result.io_wait_s for result in finished]
