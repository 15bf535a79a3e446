"""A ResNet-style CNN with BatchNorm trains in bf16 and fp16 (norm statistics take the compute dtype)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hetmem
from tests.engine.helpers import config, steady_steps, train_engine


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x, y):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        logits = self.head(h.mean(dim=(2, 3)))
        return nn.functional.cross_entropy(logits.float(), y)


def image_batches(n: int, batch: int = 8, seed: int = 0, size: int = 8):
    """Images whose class is the quadrant of a bright patch: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    half = size // 2
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=gen) * 0.5
        y = torch.randint(0, 4, (batch,), generator=gen)
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
        out.append((x, y))
    return out


# below the activations plus every parameter: chunks move in every step
BUDGET = {"fp32": "384KiB", "bf16": "192KiB", "fp16": "192KiB"}


def train(dtype: str, data):
    torch.manual_seed(0)
    model = TinyResNet()
    engine = hetmem.initialize(model, config(device_budget=BUDGET[dtype], dtype=dtype, chunk_size=4096,
                                             optimizer=dict(lr=2e-3, weight_decay=0.0)))
    return engine, model, torch.tensor(train_engine(engine, data))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_batchnorm_cnn_trains_in_low_precision_like_fp32(dtype):
    data = image_batches(20)
    _, _, fp32 = train("fp32", data)
    engine, model, low = train(dtype, data)
    assert torch.isfinite(low).all()
    assert low[-5:].mean() < low[:3].mean() * 0.7, f"{dtype} did not learn: {low.tolist()}"
    rel = ((low - fp32).abs() / fp32).max().item()
    assert rel < 0.03, f"{dtype} left the fp32 loss curve by {rel:.2%}"
    assert all(s["evictions"] for s in steady_steps(engine))
    assert engine.scheduler.peak_total <= engine.budgets.device
    compute = hetmem.config.Config(dtype=dtype).mixed_precision and engine.param_dtype
    assert model.bn.running_var.dtype == compute and model.bn.num_batches_tracked.dtype == torch.int64
    state = model.state_dict()  # the statistics come back in their original dtype
    assert state["bn.running_var"].dtype == torch.float32 and state["bn.num_batches_tracked"].item() == 20
    engine.eval()
    with torch.no_grad():
        assert torch.isfinite(engine(*data[0]))  # eval uses the running statistics
