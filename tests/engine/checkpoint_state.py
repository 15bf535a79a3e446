"""Shared by the checkpoint tests: an engine's whole training state by parameter name, compared
bit for bit (layout independent), and a small model with buffers."""
from __future__ import annotations

import torch
from torch import nn

from hetmem.checkpoint.save import Staging, chunk_on_host
from hetmem.chunk_manager.states import ChunkKind


def training_state(engine) -> dict:
    """Every parameter's bytes in every chunk kind, steps, buffers, counters, loss scale, RNG;
    read without moving any chunk (once a pending overlapped step is applied, as every reader does)."""
    engine.adam.finish_pending()
    staging = Staging()
    out = {}
    for group in engine.layout.groups:
        for kind, chunk in group.chunks.items():
            if kind is ChunkKind.GRAD:
                continue
            payload = chunk_on_host(engine.manager, chunk, staging)
            for slot in group.slots:
                out[(slot.name, kind.name)] = payload.narrow(0, slot.offset, slot.numel).clone()
    for slot in engine.layout.slots:
        out[(slot.name, "step")] = slot.step
    for name, buffer in engine.module.named_buffers():
        out[(name, "buffer")] = buffer.detach().clone()
    out["counters"] = (engine.global_step, engine.micro_step)
    out["loss_scaler"] = engine.scaler.state_dict()
    out["torch_rng"] = torch.get_rng_state()
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(got: dict, expected: dict, skip=()) -> None:
    keys = [k for k in expected if k not in skip]
    assert sorted(map(str, got)) == sorted(map(str, expected))
    for key in keys:
        a, b = got[key], expected[key]
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(_bits(a), _bits(b)), f"{key} differs"
        else:
            assert a == b, f"{key}: {a!r} != {b!r}"


class BatchNormNet(nn.Module):
    """Linear -> BatchNorm -> Linear: buffers (running stats, an int64 counter) to checkpoint."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.fc2(torch.relu(self.bn(self.fc1(x)))), y)


def bn_batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(n)]
