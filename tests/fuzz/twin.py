"""An engine and its plain-PyTorch twin, driven by the same sequence of calls.

Used by tests/fuzz/test_engine_fuzz.py (hypothesis, in CI) and benchmarks/fuzz_engine.py (a
longer run).  The twin is the model's copy with ``torch.optim.AdamW``; it follows hetmem's
documented semantics (README "Reliability"):

- a step whose gradient norm is not finite is skipped: the twin drops its gradients and
  takes no optimizer step (Adam's step count does not advance);
- a backward that raised drops every pending gradient (twin: ``zero_grad``);
- ``step()`` with nothing pending since the last step or ``zero_grad()`` does nothing;
- a step that raised part-way is finished by calling ``step()`` again (the driver retries);
- ``load_checkpoint`` restores the saved state and drops pending gradients (twin: its own
  saved copy);
- an operation that raised a documented error (``OSError`` from an injected IO fault,
  ``CheckpointError`` when there is nothing to load) leaves the state unchanged.

After every call the weights (and Adam step counts) must agree within 1e-5 relative; NaN fails.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

import hetmem
from hetmem.checkpoint import CheckpointError

RTOL = 1e-5
N_BATCHES = 6
POISONS = ("none", "1e30", "inf", "nan")
# IO faults: (kind, errno) armed on the swap file before one call, disarmed after it
FAULTS = ("error", "short")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(32, 64), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 8))


def make_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 32, generator=gen), torch.randn(4, 8, generator=gen)) for _ in range(N_BATCHES)]


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def poisoned(loss: torch.Tensor, poison: str) -> torch.Tensor:
    return loss if poison == "none" else loss * float(poison)


def engine_config(nvme_dir: str | None) -> dict:
    """fp32, chunks of 4096 elements (the model is 9 chunk groups), a device budget that holds
    about half the parameters: chunks move in every step; with ``nvme_dir`` and a host budget
    just above the optimizer pipeline's three groups, about half of the chunks live on disk."""
    config = dict(device="cpu", dtype="fp32", chunk_size=4096, device_budget="96KiB",
                  optimizer=dict(lr=1e-3, weight_decay=0.1), memory_trace=False)
    if nvme_dir is not None:
        config.update(nvme_dir=nvme_dir, host_budget="256KiB", nvme_backend="threads")
    return config


class Mismatch(AssertionError):
    pass


def assert_close(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    got, expected = got.double(), expected.double()
    bad = ~((got - expected).abs() <= RTOL * expected.abs() + 1e-7)  # NaN compares False: fails
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise Mismatch(f"{what}: {int(bad.sum())} element(s) differ, first at flat index {i}: "
                       f"hetmem {got.reshape(-1)[i].item()!r}, torch {expected.reshape(-1)[i].item()!r}")


@dataclass
class Twin:
    """The plain-PyTorch side."""

    model: nn.Module
    opt: torch.optim.Optimizer = None
    pending: bool = False                      # gradients since the last step / zero_grad
    saved: dict | None = field(default=None)   # its copy of the last successful save

    def __post_init__(self):
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.pending = False

    def step(self) -> bool:
        if not self.pending:
            return False
        squares = sum(torch.linalg.vector_norm(p.grad, dtype=torch.float32).square().double()
                      for p in self.model.parameters() if p.grad is not None)
        if math.isfinite(float(squares)):
            self.opt.step()
        self.zero_grad()
        return True

    def save(self) -> None:
        self.saved = {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict())}

    def load(self) -> None:
        self.model.load_state_dict(self.saved["model"])
        self.opt.load_state_dict(copy.deepcopy(self.saved["opt"]))
        self.zero_grad()


class Pair:
    """An engine and its twin, same init, same batches; ``run(op)`` applies one call to both."""

    def __init__(self, *, nvme: bool, seed: int = 0):
        self.folder = tempfile.mkdtemp(prefix="hetmem-fuzz-")
        model = make_model(seed)
        self.twin = Twin(copy.deepcopy(model))
        self.engine = hetmem.initialize(model, engine_config(os.path.join(self.folder, "nvme") if nvme else None))
        self.batches = make_batches(seed)
        self.log: list[str] = []
        self.errors: list[str] = []   # documented errors hetmem raised (and survived)

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- one call ------------------------------------------------------------------------

    def run(self, op: tuple) -> None:
        self.log.append(repr(op))
        name, *args = op
        try:
            if name == "fault":
                self._with_fault(*args)
            else:
                getattr(self, f"_op_{name}")(*args)
            self.check()
        except BaseException as exc:
            exc.add_note(f"calls so far: {', '.join(self.log)}; documented errors: {self.errors}")
            raise

    def _op_train(self, batch: int, poison: str) -> None:
        x, y = self.batches[batch]
        loss = loss_of(self.engine(x), y)
        twin_loss = loss_of(self.twin.model(x), y)
        assert_close("loss", loss.detach(), twin_loss.detach())
        try:
            self.engine.backward(poisoned(loss, poison))
        except OSError as exc:  # documented: the partial gradients of every pending backward are dropped
            self.errors.append(f"backward: {exc}")
            self.twin.zero_grad()
            return
        poisoned(twin_loss, poison).backward()
        self.twin.pending = True

    def _op_step(self) -> None:
        try:
            stepped = self.engine.step()
        except OSError as exc:  # documented: calling step() again applies the rest
            self.errors.append(f"step: {exc}")
            stepped = self.engine.step()
        expected = self.twin.step()
        if stepped != expected:
            raise Mismatch(f"engine.step() returned {stepped}, the twin {'stepped' if expected else 'had nothing'}")

    def _op_forward(self, batch: int, mode: str) -> None:
        x, _ = self.batches[batch]
        if mode == "eval":
            self.engine.eval()
            self.twin.model.eval()
        with torch.no_grad():
            try:
                out = self.engine(x)
            finally:
                self.engine.train()
                self.twin.model.train()
            assert_close(f"{mode} forward output", out, self.twin.model(x))

    def _op_save(self) -> None:
        self.engine.save_checkpoint(os.path.join(self.folder, "ckpt"))
        self.twin.save()

    def _op_load(self) -> None:
        folder = os.path.join(self.folder, "ckpt")
        try:
            self.engine.load_checkpoint(folder)
        except CheckpointError as exc:  # documented: nothing saved yet; nothing changed
            assert self.twin.saved is None, f"load refused although a save succeeded: {exc}"
            self.errors.append(f"load: {exc}")
            return
        except OSError as exc:  # documented: an IO error while applying it; loading again completes it
            self.errors.append(f"load: {exc}")
            self.engine.load_checkpoint(folder)
        self.twin.load()

    def _op_zero_grad(self) -> None:
        self.engine.zero_grad()
        self.twin.zero_grad()

    def _with_fault(self, kind: str, after: int, inner: tuple) -> None:
        """Arm a one-shot IO fault on the swap file, run ``inner``, disarm it."""
        swap = self.engine.manager.nvme.swap.file
        swap.inject_fault(kind, after=after)
        try:
            name, *args = inner
            getattr(self, f"_op_{name}")(*args)
        except OSError as exc:  # documented: the call failed and changed nothing
            self.errors.append(f"{name}: {exc}")
        finally:
            swap.inject_fault("none")

    # -- the property ----------------------------------------------------------------------

    def check(self) -> None:
        state = self.engine.state_dict()
        for key, value in self.twin.model.state_dict().items():
            assert_close(f"weight {key}", state[key], value)
        twin_steps = {int(s["step"]) for s in self.twin.opt.state.values()} or {0}
        engine_steps = {s.step for s in self.engine.layout.slots}
        if twin_steps != engine_steps:
            raise Mismatch(f"Adam step counts: hetmem {sorted(engine_steps)}, torch {sorted(twin_steps)}")


def replay(sequence, *, nvme: bool) -> Pair:
    """Run ``sequence`` on a fresh pair (closed after); returns it for its log and errors."""
    pair = Pair(nvme=nvme)
    try:
        for op in sequence:
            pair.run(op)
    finally:
        pair.close()
    return pair
