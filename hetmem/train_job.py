"""The main job behind `hetmem train`: a byte-level GPT on the shipped corpus, trained under
a device budget several times smaller than its parameters and Adam state.

Library code: it builds the engine and yields one ``StepMetrics`` per optimizer step; the
CLI (hetmem/commands/train.py) draws the progress bar and prints.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from hetmem.config import AdamConfig, Config
from hetmem.corpus import load_corpus, random_batch
from hetmem.engine import Engine, initialize
from hetmem.models.gpt import GPT, GPTConfig

logger = logging.getLogger("hetmem.train_job")


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
    lr: float = 2e-3
    seed: int = 0
    checkpointing: bool = True
    corpus: str | None = None
    extra: dict = field(default_factory=dict)  # more Config keys

    def model_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=256, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         d_model=self.d_model, checkpoint=self.checkpointing)

    def engine_config(self) -> Config:
        return Config(device=self.device, device_budget=self.device_budget, host_budget=self.host_budget,
                      nvme_dir=self.nvme_dir, dtype=self.dtype,
                      optimizer=AdamConfig(lr=self.lr, weight_decay=0.1), gradient_clipping=1.0,
                      **self.extra)


@dataclass
class StepMetrics:
    step: int                 # 1-based optimizer step
    loss: float
    tokens_per_s: float       # this step
    seconds: float            # this step
    peak_device_bytes: int    # the largest chunk + non-model device bytes so far
    skipped: bool             # fp16 overflow


def state_bytes(parameters: int, dtype: str) -> int:
    """Parameters plus Adam state as hetmem holds them: compute copy, fp32 master, two moments."""
    return parameters * ((4 if dtype == "fp32" else 2 + 4) + 8)


def build(options: TrainOptions) -> tuple[Engine, GPTConfig]:
    torch.manual_seed(options.seed)
    cfg = options.model_config()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = initialize(model, options.engine_config(), init_fn=model.init_weights)
    return engine, cfg


def train(engine: Engine, options: TrainOptions, start_step: int = 0,
          generator: torch.Generator | None = None) -> Iterator[StepMetrics]:
    data = load_corpus(options.corpus)
    generator = generator or torch.Generator().manual_seed(options.seed)
    tokens = options.batch_size * options.block_size
    for step in range(start_step + 1, options.steps + 1):
        started = time.perf_counter()
        x, y = random_batch(data, options.batch_size, options.block_size, generator)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        seconds = time.perf_counter() - started
        yield StepMetrics(step=step, loss=loss.item(), tokens_per_s=tokens / seconds, seconds=seconds,
                          peak_device_bytes=engine.scheduler.peak_total,
                          skipped=bool(engine.last_step and engine.last_step.skipped))


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


def default_run_dir() -> Path:
    return Path("hetmem_runs") / time.strftime("%Y%m%d-%H%M%S")
