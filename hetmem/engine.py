"""The Engine: what a user holds.  It wires the parts together and delegates to them.

    engine = hetmem.initialize(model, config)
    loss = engine(batch)          # the model's forward
    engine.backward(loss)
    engine.step()                 # at gradient-accumulation boundaries

Parts: layout (hetmem/layout.py), chunks (chunk_manager/), the tracer (tracer/), the
scheduler that places chunks at each moment (hetmem/scheduler.py), the hooks
(hetmem/hooks.py), gradient routing (hetmem/grads.py), the optimizer step
(hetmem/optimizer.py), state dicts (hetmem/state.py), the report recorder
(hetmem/recorder.py), and data parallelism when a process group is initialized
(hetmem/distributed/).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from hetmem.activations import attach as attach_activation_offload
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind
from hetmem.config import Config
from hetmem.device import Budgets, resolve_budgets, resolve_device
from hetmem.distributed import DataParallel
from hetmem.fit_hints import fit_advice
from hetmem.grads import GradRouter
from hetmem.host_memory import return_freed_buffers_to_os, trim_freed_memory
from hetmem.hooks import ModuleHooks, SavedTensorHooks
from hetmem.layout import Layout, build_layout
from hetmem.lifecycle import Lifecycle, Phase
from hetmem.loss_scaler import LossScaler
from hetmem.materialize import DTYPES, create_chunks, fill_chunks, move_buffers
from hetmem.module_state import ModuleStateHooks
from hetmem.nvme.pipeline_plan import PipelinePlan, nvme_chunk_cap, plan_pipeline
from hetmem.nvme.pipeline_tuner import PipelineTuner, swap_traffic
from hetmem.optimizer import ChunkedAdam, StepResult
from hetmem.optimizer_groups import HetmemOptimizer, config_group, resolve_user_groups
from hetmem.placement import place_all_if_it_fits, release_residency
from hetmem.scheduler import Scheduler
from hetmem.speculation import Speculation, shadow_kinds, speculation_mode
from hetmem.tracer.budget import BudgetPolicy
from hetmem.tracer.probes import make_probe
from hetmem.tracer.tracer import MemoryTracer
from hetmem.units import format_bytes
from hetmem import state as state_io

logger = logging.getLogger("hetmem.engine")

# a chunk is at most this share of the usable device budget, so a moment holds several
CHUNKS_PER_BUDGET = 8


class Engine:
    def __init__(self, model: nn.Module, config: Config, *, init_fn: Callable[[nn.Module], None] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        started = time.perf_counter()
        self.config = config
        self.module = model                                   # the user's model, hooks installed
        self.accelerator = resolve_device(config)                # the seam: hetmem/accelerator/
        self.device = self.accelerator.device
        self.data_parallel = DataParallel.from_torch(self.device)  # None: one process (hetmem/distributed/)
        self.budgets: Budgets = resolve_budgets(config, self.accelerator)
        self.param_dtype = DTYPES[config.dtype]
        max_chunk = self._auto_chunk_elements(self.budgets.usable)
        if config.nvme_dir is not None and config.chunk_size == "auto":  # a unit sized for the disk
            max_chunk = min(max_chunk, nvme_chunk_cap(sum(p.numel() for p in model.parameters()), config.param_bytes,
                                                      config.mixed_precision, self.budgets.host) or max_chunk)
        chunk_elements = None if config.chunk_size == "auto" else config.chunk_size
        if chunk_elements is not None and chunk_elements % 4096:
            chunk_elements = -(-chunk_elements // 4096) * 4096
        self.layout: Layout = build_layout(model, chunk_elements=chunk_elements, max_chunk_elements=max_chunk)
        if not self.layout.slots:
            raise ValueError(f"the model ({type(model).__name__}) has no parameters; nothing to train")
        param_groups = (resolve_user_groups(optimizer, self.layout) if optimizer is not None else
                        [(config_group(config.optimizer), [s for s in self.layout.slots if s.trainable])])
        self.module_state = ModuleStateHooks(model, self.layout)  # module.state_dict() reads the chunks
        owned = None if self.data_parallel is None else self.data_parallel.plan(self.layout, config, param_groups)
        create_chunks(self.layout, self.param_dtype, mixed=config.mixed_precision, grad_chunks=True, owned=owned)
        self.nvme_plan: PipelinePlan | None = None  # the NVMe step's shape, set by the check below
        self._check_fits_at_all()
        self.recorder = None
        if config.memory_trace:
            from hetmem.recorder import Recorder

            self.recorder = Recorder(self.layout, self.budgets, device=str(self.device), dtype=config.dtype,
                                     model_name=type(model).__name__)
        self.manager = ChunkManager(self.layout.groups, self.accelerator, events=self.recorder)
        self._release_idle = False  # set by _attach_nvme
        if config.nvme_dir is not None:
            self._attach_nvme()
        fill_chunks(model, self.layout, self.manager, init_fn=init_fn)
        self.module_state.install(self.manager)
        self.buffer_bytes = move_buffers(model, self.device,
                                         norm_dtype=self.param_dtype if config.mixed_precision else None)
        if self.data_parallel is not None:
            self.data_parallel.sync_initial_state(self.layout, self.manager, model)
        self.tracer = MemoryTracer(make_probe(self.accelerator), BudgetPolicy(self.budgets.device, self.budgets.margin))
        self.activations = attach_activation_offload(config.activation_offload, self.manager, self.tracer,
                                                     self.budgets.host)  # None when "off"
        if self.recorder is not None:
            self.recorder.attach(self.manager, self.tracer, self.activations)
        self.lifecycle = Lifecycle()                           # where a step is: hetmem/lifecycle.py
        self.scheduler = Scheduler(self.manager, self.tracer, self.layout, prefetch=config.prefetch,
                                   lifecycle=self.lifecycle, recorder=self.recorder,
                                   activations=self.activations)
        self.hooks = ModuleHooks(self.scheduler, self.tracer.probe)
        self.hooks.install(model, self.layout.module_slots)
        self.saved_tensors = SavedTensorHooks(self.scheduler, self.tracer.probe)
        self.scaler = LossScaler(config.loss_scale if config.uses_loss_scaling else None)
        self.grads = GradRouter(self.layout, self.manager, mixed=config.mixed_precision,
                                accumulation_steps=config.gradient_accumulation_steps,
                                on_schedule_change=self._on_schedule_change, in_slot=self.data_parallel is None)
        self.adam = ChunkedAdam(self.layout, self.manager, config, self.device, self.scaler, self.grads,
                                overlap=config.overlap_step and config.nvme_dir is not None  # step_pipeline.py
                                and self.data_parallel is None,   # data parallel: never overlapped
                                shard=None if self.data_parallel is None else
                                self.data_parallel.sharded_step(self.manager, lambda: self.tracer.store.schedule))
        self.adam.pipeline.spill_ahead = config.nvme_spill_ahead  # room for reads made an update early
        self.pipeline_tuner = None  # re-plans the NVMe step's depth from measured steps (nvme/pipeline_tuner.py)
        if self.nvme_plan is not None:  # groups read from NVMe ahead of the one updated
            self._use_plan(self.nvme_plan)
            self.pipeline_tuner = PipelineTuner(self.nvme_plan, self.layout.groups, self.budgets.host,
                                                config.nvme_pipeline_depth, self._use_plan,
                                                traffic=swap_traffic(self.manager.nvme))
        self.scheduler.apply_step = self.adam.apply_through          # the next forward waits per group
        self.scheduler.ready_for_prefetch = self.adam.ready_for_prefetch
        self.scheduler.read_state_early = self.adam.read_state_early  # during backward
        if self.data_parallel is not None and config.shard_params:  # Stage 2: hetmem/distributed/gather.py
            self.data_parallel.shard_params(self.manager, self.scheduler, prefetch=config.prefetch)
        self.module_state.before_access = self.adam.finish_pending
        # a torch.optim.Optimizer over the user's groups; its step() is this engine's step
        self.optimizer = HetmemOptimizer(param_groups, layout=self.layout, manager=self.manager, adam=self.adam,
                                         run_step=self._step, drop_gradients=self.zero_grad)
        if optimizer is not None and optimizer.state:
            self.optimizer.load_state_dict(optimizer.state_dict())  # the user's optimizer had stepped
        self.adam.speculation = Speculation(  # the update during backward (hetmem/speculation.py)
            self.adam, self.grads, self.manager, speculation_mode(config, self.data_parallel is not None),
            ready=lambda: not (self.tracer.recording or self.tracer.needs_warmup),
            read_groups=self.optimizer.read_groups, drop_all=self.zero_grad)
        self.global_step = 0          # optimizer steps taken, skipped (non-finite) steps included
        self.micro_step = 0           # backward passes since initialize
        self._stepped_at = 0          # micro_step when gradients were last consumed (step, zero_grad)
        self._in_slot_pending = False  # a warm-up finished; decide in-slot gradients after the step
        self.all_resident = False      # every chunk stays on the device (hetmem/placement.py)
        logger.info("hetmem engine: %d parameters in %d chunk groups of up to %d elements on %s; device budget %s",
                    self.layout.numel, len(self.layout.groups), self.layout.chunk_elements, self.device,
                    format_bytes(self.budgets.device))
        if self.recorder is not None:
            self.recorder.on_ready(time.perf_counter() - started)

    # -- construction checks -------------------------------------------------------------

    def _auto_chunk_elements(self, usable: int) -> int:
        """The largest chunk "auto" sizing may pick under ``usable`` device bytes."""
        return max(4096, usable // (CHUNKS_PER_BUDGET * self.config.param_bytes))

    def _check_fits_at_all(self) -> None:
        usable = self.budgets.usable
        for module, slots in self.layout.module_slots.items():
            chunks = {s.group.chunks[ChunkKind.PARAM] for s in slots}
            need = sum(c.nbytes for c in chunks)
            if need > usable:
                name = self.layout.module_names.get(module, type(module).__name__)
                biggest = max(chunks, key=lambda c: c.nbytes)
                raise ValueError(
                    f"device_budget={format_bytes(self.budgets.device)} (margin {format_bytes(self.budgets.margin)}) "
                    f"cannot hold module {name!r}: its parameters need {len(chunks)} chunk(s) of "
                    f"{format_bytes(need)} at once (largest {biggest.name}, {format_bytes(biggest.nbytes)}); "
                    + fit_advice(self.layout, usable, self.budgets.margin, self.config.param_bytes,
                                 None if self.config.chunk_size != "auto" else self._auto_chunk_elements))
        host_need = sum(c.nbytes for g in self.layout.groups for c in g.chunks.values()
                        if c.kind is not ChunkKind.GRAD or not self.config.mixed_precision)
        if self.config.mixed_precision:  # warm-up gradients live in GRAD chunks for one step
            host_need += sum(g.chunks[ChunkKind.GRAD].nbytes for g in self.layout.groups
                             if ChunkKind.GRAD in g.chunks)
        if self.budgets.host is not None and host_need > self.budgets.host and self.config.nvme_dir is None:
            raise ValueError(
                f"host_budget={format_bytes(self.budgets.host)} is too small for the model's chunks "
                f"({format_bytes(host_need)}: parameters, master weights, Adam states, gradients) and the "
                f"NVMe tier is off; raise host_budget or set nvme_dir to spill to disk"
                + (f" (host_budget='auto' is what device_budget={format_bytes(self.budgets.device)} leaves of host "
                   f"memory: lower device_budget)" if self.config.host_budget == "auto" and self.device.type == "cpu"
                   else ""))
        if self.config.nvme_dir is not None:  # the optimizer step's pipeline (hetmem/nvme/pipeline_plan.py)
            sizes = [g.nbytes for g in self.layout.groups]
            self.nvme_plan = plan_pipeline(max(sizes), self.budgets.host, self.config.nvme_pipeline_depth,
                                           total_bytes=sum(sizes), groups=len(sizes))

    def _attach_nvme(self) -> None:
        """Chunks past host_budget live in a swap space under nvme_dir (chunk_manager/nvme_tier.py)."""
        from hetmem.chunk_manager.nvme_tier import NvmeTier

        config = self.config
        return_freed_buffers_to_os()  # else glibc keeps freed buffers and RSS passes host_budget
        folder = config.nvme_dir if self.data_parallel is None else self.data_parallel.ctx.rank_folder(config.nvme_dir)
        tier = NvmeTier(self.manager.chunks, folder, backend=config.nvme_backend,
                        block_size=config.nvme_block_size, queue_depth=config.nvme_queue_depth,
                        threads=config.nvme_threads, checksum=config.nvme_checksum, host_limit=self.budgets.host,
                        lock=config.nvme_lock_buffers, pin=self.accelerator.pin_host,
                        manager=self.manager, shadow_kinds=shadow_kinds(config.mixed_precision)
                        if speculation_mode(config, self.data_parallel is not None) else ())
        self.manager.attach_nvme(tier, host_limit=self.budgets.host)
        release = config.nvme_release_idle
        # the IO pool's idle pages go back to the OS for each backward (nvme/io_pool.py)
        self._release_idle = (not self.accelerator.separate_memory) if release == "auto" else release

    def _use_plan(self, plan: PipelinePlan) -> None:
        self.nvme_plan, self.adam.pipeline.read_ahead = plan, plan.depth
        self.adam.pipeline.group_bytes = plan.group_bytes

    def _on_schedule_change(self, reason: str) -> None:
        self.tracer.mark_stale(reason)

    # -- training ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        args, kwargs = self._to_device(args), self._to_device(kwargs)
        if not torch.is_grad_enabled():
            return self._untraced_forward(args, kwargs)
        if self.lifecycle.state is not Phase.FORWARD:
            if self.tracer.needs_warmup:
                self.adam.finish_pending()  # a warm-up changes where gradients go
                if self.all_resident:
                    release_residency(self.manager)
                    self.all_resident = False
                self.grads.use_grad_chunks()
            self.lifecycle.go(Phase.FORWARD)
            self.scheduler.begin_microstep()
            if self.recorder is not None:
                self.recorder.begin_microstep()
        try:
            with self.saved_tensors.context(), torch.profiler.record_function("hetmem::forward"):
                if self.recorder is not None:
                    with self.recorder.phase("forward"):
                        return self.module(*args, **kwargs)
                return self.module(*args, **kwargs)
        except BaseException:
            self._abort()
            raise

    def _untraced_forward(self, args, kwargs) -> Any:
        self.adam.finish_pending()
        with self.lifecycle.untraced():
            try:
                with torch.profiler.record_function("hetmem::forward_no_grad"):
                    return self.module(*args, **kwargs)
            except BaseException:
                self._abort()
                raise

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled for fp16; divided by the accumulation steps).

        If it raises, every pending gradient is dropped (as by ``zero_grad()``) before the error
        propagates, so the next forward/backward/step runs normally (README "Reliability")."""
        self._check_open()
        if self.lifecycle.state is not Phase.FORWARD:
            raise RuntimeError("engine.backward(loss) needs a loss computed by engine(...) since the last "
                               "backward; call engine(batch) first")
        try:
            self.adam.finish_pending()  # the gradients go where the pending step reads its own
            self.adam.speculation.arm()  # the last groups' update during this backward
            if self._release_idle:
                self.manager.nvme.release_idle()  # backward's activations and gradients use that RAM
        except BaseException:
            self._abort()
            raise
        scale = self.scaler.scale / self.config.gradient_accumulation_steps
        self.lifecycle.go(Phase.BACKWARD)
        try:
            with self.saved_tensors.context(), torch.profiler.record_function("hetmem::backward"):
                target = loss * scale if scale != 1.0 else loss
                if self.recorder is not None:
                    with self.recorder.phase("backward"):
                        target.backward()
                else:
                    target.backward()
        except BaseException:
            self.grads.reset_fires()  # the counts are per backward: the next one starts from 0
            self._abort()
            self._drop_after_error("backward")
            raise
        warmup = self.tracer.recording
        self.scheduler.end_microstep()
        self.adam.speculation.end_backward()  # after the last moment's pins are released
        self.lifecycle.go(Phase.IDLE)
        self.micro_step += 1
        if warmup:
            self.grads.record_fire_counts()
            self._in_slot_pending = True
        self.grads.reset_fires()

    def step(self) -> bool:
        """The optimizer step, at accumulation boundaries; returns whether one ran.  It runs
        through ``engine.optimizer.step()``, so LR schedulers and step hooks see it.

        False (nothing counted) between accumulation boundaries and when no backward ran since
        the last step or ``zero_grad()``.  A non-finite gradient norm skips the update but counts
        in ``global_step`` (``last_step.skipped`` and ``.reason`` say why; per-parameter Adam step
        counts do not advance).  If the step raises (an IO error), calling it again applies the
        groups it did not reach; ``zero_grad()`` drops them instead (README "Reliability").
        With ``overlap_step`` the update is applied by the next forward, group by group (the
        error can surface there; then this call applies the rest and returns False).
        """
        self.optimizer.step()
        return self.optimizer.last_step_ran

    def _step(self) -> bool:
        self._check_open()
        self.lifecycle.assert_in(Phase.IDLE, doing="engine.step() after a forward without engine.backward()",
                                 fix="call engine.backward(loss) first")
        self.adam.speculation.raise_if_lost()  # a rollback dropped this step's gradients
        if self.micro_step == self._stepped_at and self.adam.pending is not None:
            self.adam.finish_pending()  # an overlapped step an IO error interrupted: apply the rest
        if self.micro_step == self._stepped_at or self.micro_step % self.config.gradient_accumulation_steps:
            return False
        self.lifecycle.go(Phase.OPTIMIZER)
        try:
            with torch.profiler.record_function("hetmem::step"):
                if self.recorder is not None:
                    with self.recorder.phase("optimizer"):
                        self.optimizer.run_update()
                else:
                    self.optimizer.run_update()
        finally:
            self.lifecycle.go(Phase.IDLE)
        self.global_step += 1
        self._stepped_at = self.micro_step
        if self._in_slot_pending and not self.tracer.needs_warmup:
            self.adam.finish_pending()
            moved = self.grads.decide_in_slot()
            if moved:
                logger.info("%d chunk groups now keep gradients in their PARAM slots", moved)
                trim_freed_memory()  # the freed GRAD chunks leave glibc's heap (hetmem/host_memory.py)
            self._in_slot_pending = False
            self.all_resident = place_all_if_it_fits(
                self.manager, self.accelerator, peak_non_model=self.tracer.store.peak_non_model,
                usable=self.budgets.usable, bring_to_host=self.scheduler.bring_to_host)
        if self.pipeline_tuner is not None:  # this step's figures, or an overlapped one's before it
            self.pipeline_tuner.observe(self.adam.last_result)
        if self.recorder is not None:
            self.recorder.end_step(self.adam.last_result)
        return True

    @property
    def last_step(self) -> StepResult | None:
        """The last step's figures (a pending overlapped step is finished first)."""
        self.adam.finish_pending()
        return self.adam.last_result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every pending gradient without a step (in-slot ones give their weights back).
        The gradients an overlapped step still applies were consumed by ``step()``: kept.

        The way back after an exception in forward, backward or step; a later ``step()`` at
        this boundary returns False.  ``set_to_none`` is accepted for torch compatibility.
        """
        self._check_open()
        self.adam.drop_gradients()
        self._stepped_at = self.micro_step

    def _drop_after_error(self, where: str) -> None:
        try:
            self.zero_grad()
        except Exception:  # noqa: BLE001 - the original error propagates; zero_grad() can be retried
            logger.exception("after the error in %s, dropping the partial gradients failed too; call "
                             "engine.zero_grad() before training on", where)
        else:
            logger.warning("%s raised: its partial gradients were dropped", where)

    def _abort(self) -> None:
        self.scheduler.abort()
        self.lifecycle.go(Phase.IDLE)
        if self.recorder is not None:
            self.recorder.abort()

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype != self.param_dtype and self.config.mixed_precision:
                return value.to(device=self.device, dtype=self.param_dtype)
            return value.to(self.device)
        if isinstance(value, tuple):
            return tuple(self._to_device(v) for v in value)
        if isinstance(value, list):
            return [self._to_device(v) for v in value]
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value

    # -- modes and state -----------------------------------------------------------------

    def train(self, mode: bool = True) -> "Engine":
        self._check_open()
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full-precision weights and buffers under the model's own keys (CPU tensors)."""
        self._check_open()
        if self.data_parallel is not None:
            return self.data_parallel.full_state_dict(self.module_state, self.layout, self.manager)
        return state_io.full_state_dict(self)

    def load_state_dict(self, state_dict, strict: bool = True):
        self._check_open()
        return state_io.load_full_state_dict(self, state_dict, strict=strict)

    def save_checkpoint(self, directory, *, tag: str | None = None, client_state=None,
                        keep: int | None = None, lr_scheduler=None):
        """Full training state, wherever it lives; see hetmem/checkpoint/.  Returns the folder."""
        from hetmem.checkpoint import save_checkpoint

        self._check_open()
        self.adam.finish_pending()
        if self.data_parallel is not None:
            return self.data_parallel.save_checkpoint(self._checkpoint_parts(), directory, tag=tag,
                                                      client_state=client_state, keep=keep, lr_scheduler=lr_scheduler)
        return save_checkpoint(self._checkpoint_parts(), directory, tag=tag, client_state=client_state, keep=keep,
                               lr_scheduler=lr_scheduler)

    def load_checkpoint(self, directory, *, tag: str | None = None, lr_scheduler=None):
        """Restore a checkpoint (``directory`` or its ``latest``); returns the saved client state."""
        from hetmem.checkpoint import load_checkpoint

        self._check_open()
        self.adam.finish_pending()
        restored = load_checkpoint(self._checkpoint_parts(), directory, tag=tag, lr_scheduler=lr_scheduler)
        self.global_step, self.micro_step = restored.global_step, restored.micro_step
        self.zero_grad()  # the loaded state starts at a boundary with no pending gradients
        return restored.client_state

    def _checkpoint_parts(self):
        from hetmem.checkpoint import CheckpointParts

        return CheckpointParts(self.layout, self.manager, self.module, self.scaler, self.config, self.optimizer,
                               self.global_step, self.micro_step, self.lifecycle.state is Phase.FORWARD)

    def memory_report(self):
        self._check_open()
        if self.recorder is None:
            raise RuntimeError("memory_report() needs memory_trace=True in the config")
        self.adam.finish_pending()
        report = self.recorder.report()
        return report if self.data_parallel is None else self.data_parallel.rank_report(report)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def nvme_capacity_bytes(self) -> int | None:
        """Bytes the swap space holds for chunks; None while the NVMe tier is off."""
        self._check_open()
        return None if self.manager.nvme is None else self.manager.nvme.nbytes

    @property
    def _closed(self) -> bool:
        return self.lifecycle.state is Phase.CLOSED

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed (engine.close() was called); engine.module keeps the "
                               "trained weights: use it directly, or wrap it again with hetmem.initialize()")

    def close(self, *, keep_weights: bool = True) -> None:
        """Release hetmem's memory and hooks.  The module keeps its trained weights as ordinary
        host tensors (raises first, leaving the engine open, when they cannot fit in host memory);
        ``keep_weights=False`` leaves it with empty placeholders."""
        if self._closed:
            return
        if keep_weights:
            self.adam.finish_pending()
            self.module_state.check_host_room()
            if self.data_parallel is not None:   # shard_params: other ranks' parameters gathered (a collective)
                self.data_parallel.gather_all(self.layout)
        self.lifecycle.go(Phase.CLOSED)
        self.hooks.remove()
        self.grads.remove()
        if self.activations is not None:
            self.activations.close()
        try:
            if keep_weights:
                self.module_state.give_back_weights()
        finally:
            self.module_state.remove()
            self.manager.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def initialize(model: nn.Module, config: Config | dict | str | None = None, *,
               init_fn: Callable[[nn.Module], None] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> Engine:
    """Wrap ``model`` for training under the config's budgets.  ``optimizer``: a torch Adam or
    AdamW over the model's parameters whose groups hetmem trains with (hetmem/optimizer_groups.py);
    without it ``config.optimizer`` applies to every trainable parameter.  See README."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap your "
                         f"function in a Module")
    return Engine(model, Config.coerce(config), init_fn=init_fn, optimizer=optimizer)
