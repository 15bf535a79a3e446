"""The README's engine(...) calling contract: what is cast and moved, what passes through."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch
from torch import nn

import hetmem
from tests.engine.helpers import config

Pair = namedtuple("Pair", "a b")


class Holder:
    def __init__(self, tensor):
        self.tensor = tensor


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.seen = None

    def forward(self, *args, **kwargs):
        self.seen = (args, kwargs)
        return (self.weight * 2).sum()


def test_inputs_are_cast_and_moved_as_documented():
    model = Recorder()
    engine = hetmem.initialize(model, config(dtype="bf16"))
    x, ids, holder = torch.randn(2, 3, dtype=torch.float64), torch.tensor([1, 2]), Holder(torch.randn(2))
    nested = OrderedDict(a=[x, (ids, Pair(x, ids))])
    out = engine(x, nested, 3, "s", None, holder, mask=torch.ones(2, dtype=torch.bool))
    args, kwargs = model.seen
    assert out.dtype == torch.bfloat16
    assert args[0].dtype == torch.bfloat16 and torch.equal(args[0], x.bfloat16())
    inner = args[1]
    assert type(inner) is dict and type(inner["a"]) is list and type(inner["a"][1][1]) is tuple
    assert inner["a"][0].dtype == torch.bfloat16 and inner["a"][1][0].dtype == torch.int64
    assert inner["a"][1][1][0].dtype == torch.bfloat16  # inside the (former) namedtuple too
    assert args[2:5] == (3, "s", None) and args[5] is holder and holder.tensor.dtype == torch.float32
    assert kwargs["mask"].dtype == torch.bool
    engine.close()
    fp32 = hetmem.initialize(Recorder(), config(dtype="fp32"))
    fp32(x)
    assert fp32.module.seen[0][0].dtype == torch.float64  # fp32 training casts nothing
