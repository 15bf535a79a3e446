"""The NVMe IO pool's idle pages go back to the OS at the start of each backward when the compute
device is the CPU (``nvme_release_idle``), and training is bit-identical either way."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier

from .helpers import batches, config, pair, train_engine


HOST = {"fp32": "14MiB", "bf16": "26MiB"}  # about half the chunk bytes; three groups fit the pipeline


def _engine(tmp_path, name: str, dtype: str, **overrides) -> hetmem.Engine:
    _, model = pair(d_model=256, n_layer=4)
    return hetmem.initialize(model, config(device_budget="5MiB", host_budget=HOST[dtype], chunk_size="1MiB",
                                           dtype=dtype, nvme_dir=str(tmp_path / name), **overrides))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_released_pages_come_back_and_training_is_bit_identical(tmp_path, dtype):
    data = batches(4)
    kept = _engine(tmp_path, "kept", dtype, nvme_release_idle=False)
    released = _engine(tmp_path, "released", dtype, nvme_release_idle=True)
    assert released._release_idle and not kept._release_idle
    tier, calls = released.manager.nvme, []
    release = tier.release_idle
    tier.release_idle = lambda: calls.append(release()) or calls[-1]
    expected = train_engine(kept, data)
    losses = train_engine(released, data)
    pool = tier.pool
    assert len(calls) == len(data), "every backward must release the pool's idle pages"
    assert sum(calls) > 0 and pool.releases >= 1, "some backward must find whole idle huge pages to release"
    assert pool.refaulted > 0, "blocks taken after a release must fault their pages back in"
    assert kept.manager.nvme.pool.releases == 0 and kept.manager.nvme.pool.refaulted == 0
    assert released.manager.moved_bytes > 0 and released.manager.bytes_on(Tier.NVME) > 0, "state must move"
    assert losses == expected
    for (name, a), (_, b) in zip(kept.state_dict().items(), released.state_dict().items()):
        assert torch.equal(a, b), name
    kept.close()
    released.close()


def test_auto_releases_when_the_compute_device_shares_host_ram(tmp_path):
    engine = _engine(tmp_path, "auto", "fp32")
    assert engine._release_idle == (not engine.accelerator.separate_memory)
    engine.close()
    plain = hetmem.initialize(pair()[1], config())  # no NVMe tier: nothing to release
    assert not plain._release_idle
    plain.close()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_release_setting_names_the_key(value):
    with pytest.raises(ValueError, match="nvme_release_idle"):
        hetmem.Config(nvme_release_idle=value)
