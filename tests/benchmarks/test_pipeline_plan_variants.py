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
