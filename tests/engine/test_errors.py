"""Bad configs and misuse raise errors that name the key (or the state) and the fix."""
from __future__ import annotations

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, config, tiny_gpt
from tests.nvme.conftest import mounted


def _nvme_config(nvme_dir) -> hetmem.Config:
    return config(device_budget="2304KiB", host_budget="1MiB", nvme_dir=str(nvme_dir))


def test_nvme_dir_that_is_a_file(tmp_path):
    target = tmp_path / "swap"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=r"nvme_dir='.*swap' cannot hold the swap space: it is a file, not a folder; "
                                         r"give nvme_dir a folder you can write to"):
        hetmem.initialize(tiny_gpt(), _nvme_config(target))
    assert target.read_text() == "not a folder"


def test_nvme_dir_that_cannot_be_reached(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"nvme_dir=.*creating it failed \(Not a directory\); give nvme_dir a folder"):
        hetmem.initialize(tiny_gpt(), _nvme_config(tmp_path / "file" / "below"))


@pytest.fixture
def read_only_dir(tmp_path):
    yield from mounted(tmp_path, "tmpfs", ["-o", "size=1m,ro"])


def test_nvme_dir_on_a_read_only_file_system(read_only_dir):
    with pytest.raises(ValueError, match=r"nvme_dir=.* cannot hold the swap space: it is on a read-only file system"):
        hetmem.initialize(tiny_gpt(), _nvme_config(read_only_dir))


def test_a_device_budget_above_host_memory_blames_device_budget():
    with pytest.raises(ValueError, match=r"^device_budget=1.00 TiB is more than the .* (of host memory available here|free on )"):
        hetmem.initialize(tiny_gpt(), config(device_budget="1TiB"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_scale_without_fp16_is_refused(dtype):
    with pytest.raises(ValueError, match=rf"loss_scale=128.0 is invalid: loss scaling applies only to dtype='fp16', "
                                         rf"not dtype='{dtype}'"):
        hetmem.Config(dtype=dtype, loss_scale=128.0)


def test_nvme_keys_without_nvme_dir_are_warned_about_by_name():
    with pytest.warns(UserWarning, match=r"^nvme_queue_depth, nvme_checksum have no effect without nvme_dir"):
        hetmem.Config(nvme_queue_depth=4, nvme_checksum=False)
    with pytest.warns(UserWarning, match=r"^nvme_block_size has no effect"):
        hetmem.Config.coerce({"nvme_block_size": "2MiB"})


def test_defaults_are_torchs_and_checksums_are_on():
    c = hetmem.Config()
    assert c.gradient_clipping is None and c.nvme_checksum is True


CALLS = {
    "__call__": lambda e, x, y: e(x, y),
    "backward": lambda e, x, y: e.backward(torch.tensor(1.0, requires_grad=True)),
    "step": lambda e, x, y: e.step(),
    "zero_grad": lambda e, x, y: e.zero_grad(),
    "train": lambda e, x, y: e.train(),
    "eval": lambda e, x, y: e.eval(),
    "state_dict": lambda e, x, y: e.state_dict(),
    "load_state_dict": lambda e, x, y: e.load_state_dict({}),
    "save_checkpoint": lambda e, x, y: e.save_checkpoint("unused"),
    "load_checkpoint": lambda e, x, y: e.load_checkpoint("unused"),
    "memory_report": lambda e, x, y: e.memory_report(),
    "nvme_capacity_bytes": lambda e, x, y: e.nvme_capacity_bytes(),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_of_a_closed_engine_says_it_is_closed(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = hetmem.initialize(tiny_gpt(), config())
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    engine.step()
    engine.close()
    with pytest.raises(RuntimeError, match=r"^this engine is closed \(engine.close\(\) was called\)"):
        CALLS[method](engine, x, y)
    assert not (tmp_path / "unused").exists()
