"""The main job behind `hetmem train`: a byte-level GPT on the shipped corpus, trained under
a device budget several times smaller than its parameters and Adam state.

Library code: it builds the engine (AdamW over the model's groups, a warm-up + cosine or
constant LambdaLR on ``engine.optimizer``), yields one ``StepMetrics`` per optimizer step,
checkpoints every ``save_every`` steps with the data generator, the schedule and the losses in
the client state, and resumes from such a checkpoint bit-exactly.  The CLI
(hetmem/commands/train.py) draws the progress bar and prints.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from hetmem.config import Config
from hetmem.corpus import load_corpus, random_batch
from hetmem.engine import Engine, initialize
from hetmem.models.gpt import GPT, GPTConfig

logger = logging.getLogger("hetmem.train_job")


LR_SCHEDULES = ("cosine", "constant")
MIN_LR_RATIO = 0.1          # cosine decays to this share of --lr
CHECKPOINTS = "checkpoints"  # the run folder's checkpoint folder
OPTIONS_FILE = "options.json"
KEEP_CHECKPOINTS = 2
WEIGHT_DECAY = 0.1           # on matrices; biases and norms get none


@dataclass(frozen=True)
class TrainOptions:
    d_model: int = 384
    n_layer: int = 8
    n_head: int = 6
    block_size: int = 128
    batch_size: int = 8
    steps: int = 300
    dtype: str = "bf16"
    device: str = "auto"
    device_budget: str | int = "12MiB"
    host_budget: str | int = "auto"
    nvme_dir: str | None = None
    lr: float = 1e-3
    lr_schedule: str = "cosine"   # after the warm-up: "cosine" (to MIN_LR_RATIO * lr) or "constant"
    warmup_steps: int = 20        # steps of linear learning-rate warm-up
    save_every: int = 0           # checkpoint every this many steps and at the end (0: never)
    seed: int = 0
    checkpointing: bool = True
    corpus: str | None = None
    extra: dict = field(default_factory=dict)  # more Config keys

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not a schedule; use one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.save_every < 0:
            raise ValueError(f"save_every={self.save_every}: give a number of steps >= 1, or 0 for no checkpoints")

    def model_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=256, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         d_model=self.d_model, checkpoint=self.checkpointing)

    def engine_config(self) -> Config:
        return Config(device=self.device, device_budget=self.device_budget, host_budget=self.host_budget,
                      nvme_dir=self.nvme_dir, dtype=self.dtype,
                      gradient_clipping=1.0,
                      **self.extra)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) as a share of ``lr``: linear
        warm-up to 1 over ``warmup_steps``, then constant or a cosine to MIN_LR_RATIO."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepMetrics:
    step: int                 # 1-based optimizer step
    loss: float
    lr: float                 # the learning rate this step used
    tokens_per_s: float       # this step
    seconds: float            # this step
    peak_device_bytes: int    # the largest chunk + non-model device bytes so far
    skipped: bool             # non-finite gradients: the step changed nothing


@dataclass
class TrainState:
    """What a resumed run needs besides the engine's checkpoint: where the data stream and the
    schedule are, and the losses so far (for the report)."""

    generator: torch.Generator                          # draws the batches
    step: int = 0                                       # optimizer steps done
    losses: list[dict] = field(default_factory=list)   # {"step", "loss", "lr"} per step

    def client_state(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state(), "losses": list(self.losses)}


def state_bytes(parameters: int, dtype: str) -> int:
    """Parameters plus Adam state as hetmem holds them: compute copy, fp32 master, two moments."""
    return parameters * ((4 if dtype == "fp32" else 2 + 4) + 8)


def ops_needed(options: TrainOptions) -> list:
    """The C++ ops a run uses: the CPU Adam, and the IO engine with the NVMe tier."""
    from hetmem.ops.builder import builder

    return [builder("cpu_adam")] + ([builder("aio")] if options.nvme_dir else [])


def load_ops(options: TrainOptions) -> list[str]:
    """Load (building if needed) the ops a run uses, so the first step does not; returns the
    ops that could not be built (their pure-PyTorch fallbacks run, with a logged warning)."""
    from hetmem.nvme._op import aio_op
    from hetmem.ops import adam

    missing = []
    for op in ops_needed(options):
        loaded = adam.is_available() if op.name == "cpu_adam" else aio_op() is not None
        if not loaded:
            missing.append(op.name)
    return missing


def build(options: TrainOptions) -> tuple[Engine, GPTConfig]:
    torch.manual_seed(options.seed)
    cfg = options.model_config()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = initialize(model, options.engine_config(), init_fn=model.init_weights, optimizer=adamw(model, options))
    return engine, cfg


def adamw(model: torch.nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases, norms), as GPT training does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=options.lr)


def make_scheduler(engine: Engine, options: TrainOptions) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(engine.optimizer, options.lr_factor)


def new_state(options: TrainOptions) -> TrainState:
    return TrainState(generator=torch.Generator().manual_seed(options.seed))


def resume_state(engine: Engine, scheduler, run_dir: Path) -> TrainState:
    """Load the run's latest checkpoint into ``engine`` and ``scheduler``; the data stream
    continues where it was, so the losses equal those of an uninterrupted run."""
    client = engine.load_checkpoint(run_dir / CHECKPOINTS, lr_scheduler=scheduler)  # groups' lr included
    if not isinstance(client, dict) or "generator" not in client:
        from hetmem.checkpoint import CheckpointError

        raise CheckpointError(f"{run_dir / CHECKPOINTS} was not written by `hetmem train` (no data position "
                              f"in its client state); resume it with engine.load_checkpoint in your own code")
    generator = torch.Generator()
    generator.set_state(client["generator"])
    return TrainState(generator=generator, step=int(client["step"]), losses=list(client["losses"]))


def train(engine: Engine, options: TrainOptions, scheduler, state: TrainState, *,
          checkpoint_dir: Path | None = None) -> Iterator[StepMetrics]:
    """Train from ``state.step`` to ``options.steps``, yielding each step's metrics; with
    ``options.save_every`` a checkpoint goes to ``checkpoint_dir`` every that many steps and at
    the end."""
    data = load_corpus(options.corpus)
    tokens = options.batch_size * options.block_size
    dp = engine.data_parallel  # every rank draws the same batch and trains on its slice of it
    if dp is not None and options.batch_size % dp.world_size:
        raise ValueError(f"batch_size={options.batch_size} must be a multiple of the number of ranks "
                         f"({dp.world_size}): each rank trains on an equal slice of every batch")
    for step in range(state.step + 1, options.steps + 1):
        started = time.perf_counter()
        lr = engine.optimizer.param_groups[0]["lr"]
        x, y = random_batch(data, options.batch_size, options.block_size, state.generator)
        if dp is not None:
            x, y = dp.slice_batch(x), dp.slice_batch(y)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        scheduler.step()
        seconds = time.perf_counter() - started
        state.step = step
        state.losses.append({"step": step, "loss": loss.item() if dp is None else dp.mean(loss), "lr": lr})
        every = options.save_every
        if every and checkpoint_dir is not None and (step % every == 0 or step == options.steps):
            engine.save_checkpoint(checkpoint_dir, client_state=state.client_state(), lr_scheduler=scheduler,
                                   keep=KEEP_CHECKPOINTS)
        yield StepMetrics(step=step, loss=state.losses[-1]["loss"], lr=lr, tokens_per_s=tokens / seconds,
                          seconds=seconds, peak_device_bytes=engine.scheduler.peak_total,
                          skipped=engine.adam.last_skipped)  # engine.last_step would finish an overlapped step


@torch.no_grad()
def sample(engine: Engine, prompt: str, length: int, block_size: int, seed: int = 0,
           temperature: float = 0.8) -> str:
    """Continue ``prompt`` byte by byte (the model is byte-level)."""
    engine.eval()
    generator = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)
    for _ in range(length):
        logits = engine(idx[:, -block_size:])[0, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    engine.train()
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


RUNS = Path("hetmem_runs")


def default_run_dir() -> Path:
    return RUNS / time.strftime("%Y%m%d-%H%M%S")


def latest_run_dir() -> Path:
    """The newest run under hetmem_runs/ that has a checkpoint."""
    runs = sorted(p.parent.parent for p in RUNS.glob(f"*/{CHECKPOINTS}/latest"))
    if not runs:
        raise FileNotFoundError(f"no run under {RUNS}/ has a checkpoint to resume; train with --save-every N "
                                f"first, or give the run folder: --resume RUN_DIR")
    return runs[-1]


def read_options(run_dir: Path) -> TrainOptions:
    path = run_dir / OPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not the folder of a `hetmem train` run")
    return TrainOptions.from_dict(json.loads(path.read_text()))


def write_options(run_dir: Path, options: TrainOptions) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OPTIONS_FILE).write_text(json.dumps(options.to_dict(), indent=2, default=str))
