"""``HetmemTrainer``: the Hugging Face ``Trainer``, training through hetmem.

    from hetmem.integrations.transformers import HetmemTrainer

    trainer = HetmemTrainer(hetmem_config={"device_budget": "6GiB"}, model=model, args=training_args,
                            train_dataset=dataset)
    trainer.train()

Everything the Trainer does stays the Trainer's: data loading, the optimizer's parameter groups
(``weight_decay`` with its own no-decay grouping, ``learning_rate``, ``adam_beta1/2``,
``adam_epsilon``, or the optimizer given in ``optimizers=``), the scheduler
(``lr_scheduler_type``, warm-up), logging, evaluation, ``save_steps``/``save_total_limit`` and
``resume_from_checkpoint``.  hetmem takes the model's memory:

- The optimizer the Trainer builds (a ``torch.optim.AdamW``) is handed to
  ``hetmem.initialize(model, config, optimizer=...)``; the Trainer then holds
  ``engine.optimizer``, whose ``step()`` is the engine's step, so the Trainer's own
  ``optimizer.step()`` is the one step (``zero_grad`` drops pending gradients, none after a step).
- Forward and backward go through the engine (``engine(**inputs)``, ``engine.backward``): the
  model the Trainer calls is ``EngineModel``, a thin module whose forward is the engine's.
- hetmem's device is the Trainer's (``TrainingArguments.device``; ``use_cpu=True`` for the CPU).
  ``max_grad_norm`` becomes hetmem's ``gradient_clipping`` (0 or None: off) and the Trainer's
  own clipping is skipped; ``gradient_accumulation_steps`` and ``bf16``/``fp16`` (hetmem's
  ``dtype``; neither: fp32) are hetmem's too, and accelerate's mixed precision is off (hetmem
  casts and scales).  The model is not moved by the Trainer or accelerate: hetmem places it.
- A checkpoint folder ``checkpoint-N`` holds the Trainer's files (the model's weights, the
  scheduler, RNG and trainer state) and ``hetmem/``, the engine's checkpoint (master weights,
  Adam moments and steps wherever they lived, with the scheduler's state); resuming from it is
  bit-exact.  A checkpoint from a plain Trainer (``optimizer.pt``) resumes too.

Only full accumulation windows can step: with ``gradient_accumulation_steps > 1`` the batches
per epoch must be a multiple of it (``dataloader_drop_last`` or a dataset size that divides).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import hetmem
from hetmem.config import Config

logger = logging.getLogger("hetmem.integrations.transformers")

CHECKPOINT_DIR = "hetmem"           # the engine's checkpoint inside the Trainer's checkpoint-N
SCHEDULER_NAME = "scheduler.pt"     # as the Trainer names it
# Config keys TrainingArguments decide; a hetmem_config dict that sets them otherwise is an error
TRAINER_KEYS = {"dtype": "bf16 / fp16", "gradient_clipping": "max_grad_norm",
                "gradient_accumulation_steps": "gradient_accumulation_steps",
                "optimizer": "learning_rate, weight_decay, adam_beta1/2, adam_epsilon (or optimizers=)"}


class EngineModel(nn.Module):
    """The model as the Trainer calls it: forward through the engine.  It holds the user's
    model as ``module`` (so ``.train()``, ``.eval()`` and ``.parameters()`` reach it)."""

    def __init__(self, engine: "hetmem.Engine"):
        super().__init__()
        self.module = engine.module
        self.engine = engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def _get_name(self) -> str:   # the Trainer's label smoothing asks the model class by name
        return self.module._get_name()


def hetmem_config_for(args: transformers.TrainingArguments, hetmem_config) -> Config:
    """``hetmem_config`` with the keys TrainingArguments decide filled in from ``args``."""
    implied = {
        "dtype": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "gradient_clipping": float(args.max_grad_norm) if args.max_grad_norm else None,
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
    }
    if isinstance(hetmem_config, dict):
        for key, value in hetmem_config.items():
            if key in TRAINER_KEYS and (key == "optimizer" or value != implied[key]):
                raise ValueError(f"hetmem_config[{key!r}]={value!r}: with HetmemTrainer the TrainingArguments "
                                 f"decide it ({TRAINER_KEYS[key]}); remove it from hetmem_config")
    config = Config.coerce(hetmem_config)
    if config.device == "auto":                         # the Trainer's device (inputs and losses live there)
        implied["device"] = str(args.device)
    elif torch.device(config.device).type != args.device.type:
        raise ValueError(f"hetmem_config['device']={config.device!r} but the Trainer runs on {args.device}; "
                         f"leave device out of hetmem_config (it follows TrainingArguments, e.g. use_cpu=True)")
    return dataclasses.replace(config, **implied)


class HetmemTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains through hetmem; see the module docstring.

    ``hetmem_config``: a ``hetmem.Config``, a dict of its keys or a JSON file path (device,
    budgets, ``nvme_dir``, ``chunk_size``, ...).  ``trainer.engine`` is the engine once
    training (or evaluation) started; ``trainer.engine.close()`` ends it, leaving the model
    with its trained weights.
    """

    def __init__(self, *args: Any, hetmem_config: Config | dict | str | os.PathLike | None = None,
                 **kwargs: Any):
        self.engine: hetmem.Engine | None = None      # built with the optimizer, at the first train/eval
        self._engine_model: EngineModel | None = None  # what the Trainer calls as its model
        super().__init__(*args, **kwargs)
        self.hetmem_config = hetmem_config_for(self.args, hetmem_config)
        self.accelerator.device_placement = False      # hetmem places the model and the optimizer state

    # -- what accelerate must not do -----------------------------------------------------

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        accelerator_args = super()._build_accelerator_args(**kwargs)
        accelerator_args["mixed_precision"] = "no"     # hetmem's dtype and loss scaling instead
        return accelerator_args

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """hetmem moves the model's chunks itself, within its budget."""

    # -- the engine ----------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (its groups and hyperparameters), handed to hetmem; the
        Trainer then holds ``engine.optimizer``."""
        if self.engine is None:
            user_optimizer = super().create_optimizer(self.model)
            self.engine = hetmem.initialize(self.model, self.hetmem_config, optimizer=user_optimizer)
            self._engine_model = EngineModel(self.engine)
            self.optimizer = self.engine.optimizer
            logger.info("hetmem engine: %d parameters in %d chunk groups, device budget %d bytes on %s",
                        self.engine.layout.numel, len(self.engine.layout.groups), self.engine.budgets.device,
                        self.engine.device)
        return self.optimizer

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if self.engine is None:
            self.create_optimizer()
        return self._engine_model

    # -- the step ------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's loss, backpropagated by the engine (which divides it by the
        accumulation steps: a loss the Trainer would not divide is multiplied back)."""
        accumulation = self.args.gradient_accumulation_steps
        if self.current_gradient_accumulation_steps != accumulation:
            raise ValueError(
                f"this accumulation window has {self.current_gradient_accumulation_steps} of "
                f"gradient_accumulation_steps={accumulation} batches (the end of an epoch); hetmem steps only "
                f"at full windows: make the batches per epoch a multiple of it (dataloader_drop_last=True and "
                f"a dataset size that divides)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        scaled_for_accumulation = self.loss_is_scaled_for_ga
        if scaled_for_accumulation is None:
            scaled_for_accumulation = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if scaled_for_accumulation:
            self.engine.backward(loss * accumulation if accumulation != 1 else loss)
            return loss.detach()
        self.engine.backward(loss)
        return (loss / accumulation).detach()

    def _clip_grad_norm(self, model: nn.Module):
        """hetmem clips inside its step (gradient_clipping = max_grad_norm)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        return None   # known after the step: _maybe_log_save_evaluate reads hetmem's

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args: Any, **kwargs: Any) -> None:
        # the norm is known at engine.step(); engine.last_step would finish an overlapped step
        norm = self.engine.adam.last_grad_norm if self.engine is not None else None
        if norm is not None:
            grad_norm = norm
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The engine's checkpoint (with the scheduler's state) in ``output_dir/hetmem``, and
        the scheduler as the Trainer saves it."""
        self.engine.save_checkpoint(Path(output_dir) / CHECKPOINT_DIR, lr_scheduler=self.lr_scheduler)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint) / CHECKPOINT_DIR
        if not folder.is_dir():   # a plain Trainer's checkpoint: optimizer.pt loads into engine.optimizer
            logger.info("%s has no hetmem checkpoint; loading the Trainer's optimizer.pt and scheduler.pt",
                        checkpoint)
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        self.engine.load_checkpoint(folder, lr_scheduler=self.lr_scheduler)  # and the groups' hyperparameters
