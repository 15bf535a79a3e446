"""Shared by the engine tests: a tiny GPT, corpus batches, plain-PyTorch reference training."""
from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
from pathlib import Path

import torch

import hetmem
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=256, block_size=32, n_layer=3, n_head=4, d_model=64)
    base.update(overrides)
    return GPTConfig(**base)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def batches(n: int, batch_size: int = 4, block_size: int = 32, seed: int = 0):
    data = load_corpus()
    gen = torch.Generator().manual_seed(seed)
    return [random_batch(data, batch_size, block_size, gen) for _ in range(n)]


def train_plain(model, data, *, lr=1e-3, weight_decay=0.1, clip=None, accumulation=1, dtype=torch.float32,
                decoupled=True):
    """Plain PyTorch: torch.optim.AdamW (or Adam), optional clipping and accumulation."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for i, (x, y) in enumerate(data):
        loss = model(x, y)
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (i + 1) % accumulation == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad()
    return losses


def train_engine(engine, data):
    losses = []
    for x, y in data:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        assert_no_pins(engine)
    return losses


def assert_no_pins(engine):
    """Between steps nothing is in use: every pin taken was released."""
    leaked = [c.name for c in engine.manager.chunks if c.pins]
    assert not leaked, f"chunks still pinned after a step: {leaked}"
    busy = [s.name for s in engine.layout.slots if s.compute_users]
    assert not busy, f"parameters still in use after a step: {busy}"


def config(**overrides) -> hetmem.Config:
    base = dict(device="cpu", device_budget="4MiB", dtype="fp32", chunk_size=8192, gradient_clipping=None,
                optimizer=dict(lr=1e-3, weight_decay=0.1))
    base.update(overrides)
    return hetmem.Config(**base)


def pair(seed: int = 0, **model_overrides):
    """(reference model, identical copy for hetmem)."""
    ref = tiny_gpt(seed, **model_overrides)
    return ref, copy.deepcopy(ref)


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        d = (b[k].float() - v.float()).abs() / v.float().abs().clamp_min(1e-3)
        worst = max(worst, d.max().item())
    return worst


def steady_steps(engine):
    return [s for s in engine.recorder.steps if not s["warmup"]]


ROOT = Path(__file__).resolve().parents[2]


def run_resume_worker(*args) -> None:
    """tests/engine/resume_worker.py in a fresh process (see its main())."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "tests.engine.resume_worker", *map(str, args)], check=True, cwd=ROOT,
                   env=env, timeout=300)


class FailingStore:
    """A swap store request whose IO lands and then reports an IO error (as a short write does):
    the bytes stay in host memory (chunk_manager/manager.py ``store_failed``)."""

    def __init__(self, request, message: str = "injected write error"):
        self.request, self.message = request, message

    def done(self) -> bool:
        return self.request.done()

    def wait(self) -> None:
        self.request.wait()
        raise OSError(errno.EIO, self.message)

    @property
    def error(self):
        return OSError(errno.EIO, self.message) if self.request.done() else None


def watch_sends(engine, owner, name: str, describe) -> dict:
    """Wrap ``owner.<name>`` and ``engine.manager.move``: each move made inside a call of that
    method goes to ``seen["sent"]`` as ``describe(chunk, dst, call_args)``, host bytes past
    host_budget after any move to ``seen["over_budget"]``; ``seen["calls"]`` counts the calls."""
    from hetmem.chunk_manager.states import Tier

    manager = engine.manager
    seen = {"sent": [], "over_budget": [], "calls": 0}
    method, move = getattr(owner, name), manager.move
    inside: list[tuple] = []

    def watched(*args):
        seen["calls"] += 1
        inside.append(args)
        try:
            return method(*args)
        finally:
            inside.pop()

    def watched_move(chunk, dst, *, cause, optional=False):
        if inside:
            seen["sent"].append(describe(chunk, dst, inside[-1]))
        transfer = move(chunk, dst, cause=cause, optional=optional)
        if manager.bytes_on(Tier.HOST) > manager.host_limit:
            seen["over_budget"].append(manager.bytes_on(Tier.HOST))
        return transfer

    setattr(owner, name, watched)
    manager.move = watched_move
    return seen
