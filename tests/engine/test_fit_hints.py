"""Following the fix a construction error proposes works: the chunk_size or device_budget it
names either initializes, or gives a strictly better proposal that then does."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import hetmem
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.units import parse_size


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    with torch.device("meta"):
        return GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, d_model=64))


def _linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])


def _initialize(make, budget, chunk_size):
    model = make()
    init_fn = model.init_weights if isinstance(model, GPT) else None
    return hetmem.initialize(model, {"device": "cpu", "device_budget": budget, "dtype": "fp32",
                                     "chunk_size": chunk_size, "memory_trace": False}, init_fn=init_fn)


def _follow(make, budget, chunk_size, key: str) -> list[str]:
    """Initialize, and while it fails follow the error's proposal for ``key``; the messages."""
    messages = []
    for _ in range(3):
        try:
            _initialize(make, budget, chunk_size).close()
            return messages
        except ValueError as error:
            message = str(error)
            messages.append(message)
        if key == "chunk_size":
            found = re.search(r"chunk_size <= (\d+) elements", message)
            assert found, message
            proposed = int(found.group(1))
            assert chunk_size == "auto" or proposed < chunk_size   # strictly better, or it would loop
            chunk_size = proposed
        else:
            found = re.search(r"raise device_budget to at least ([\d.]+ [KMG]?i?B)", message)
            assert found, message
            proposed = parse_size(found.group(1).replace(" ", ""))
            assert proposed > parse_size(budget) if isinstance(budget, str) else budget
            budget = proposed
    raise AssertionError(f"still failing after following the hints: {messages}")


@pytest.mark.parametrize("make, budget, chunk_size", [
    (_linears, "40KiB", 65536),     # chunks far larger than a module: a smaller chunk_size fits
    (_gpt, "200KiB", 100000),       # the embedding is one 64 KiB parameter in a 400 KiB chunk
])
def test_following_the_chunk_size_hint_works(make, budget, chunk_size):
    messages = _follow(make, budget, chunk_size, "chunk_size")
    assert len(messages) == 1


@pytest.mark.parametrize("make, budget, chunk_size", [
    (_gpt, "60KiB", "auto"),        # wte (64 KiB) alone exceeds the budget: no chunk_size helps
    (_linears, "20KiB", 65536),
    (_linears, "20KiB", "auto"),
])
def test_following_the_budget_hint_works(make, budget, chunk_size):
    messages = _follow(make, budget, chunk_size, "device_budget")
    assert len(messages) == 1
    if make is _gpt:
        assert "no smaller chunk_size fits" in messages[0] and "chunk_size <=" not in messages[0]
