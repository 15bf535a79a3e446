"""Training with the optimizer state on NVMe: scale, memory and speed, in one run.

A GPT whose parameters + Adam state are several times device_budget + host_budget trains
for a few steps with nvme_dir set.  In the same run:

- the disk's mixed read+write throughput (reads of one region while another is written, as
  the pipelined step does) is measured with hetmem's NVMe benchmark core, before and after
  training, at the engine's IO settings and chunk size, through buffers of the kind the engine's
  IO pool hands out (hetmem/nvme/io_pool.py; the kind is printed next to both figures);
- the process RSS is sampled every 20 ms (psutil) from before the engine exists, so the
  peak above that baseline can be compared with the budgets;
- the step's own disk time: the swap space's requests during each steady optimizer step are
  recorded (order, read/write, blob, bytes, how many in flight) and replayed alone right after
  that step, before the next one, through the same IO settings and buffers of the same kind
  (hetmem/nvme/replay.py): step and replay are paired in time, because this kind of virtual disk
  drifts by tens of percent over a run; a step's bytes over its wall time, over its replay's rate, is the
  share of the disk it reached (the goal: >= 90%, the CPU Adam and the checksums hidden behind
  the IO; the median over the steps is reported); it is also compared with the generic mixed
  figure above;
- the IO pool's figures (payloads handed out, spills to defragment it) and the pipeline's plan
  (``--pipeline-depth``, ``--chunk-size``: its unit) are reported;
- swap checksums (``nvme_checksum``, on by default): two more engines, checksums on and off,
  stepped in turn on the same batches: the median of the paired step-time ratios on/off, and
  the crc32c time the swap space counts as a share of the step (``--checksum-repeats`` passes);
- the overlapped optimizer step: three more engines, synchronous (``overlap_step`` off),
  waiting (on, ``step_speculation`` off) and speculative (both on), stepped in turn on the same
  batches: forward+backward and iteration time of each, the synchronous step's disk time (its
  bytes over the disk's mixed rate, ``step_disk_s``), the target ratio iteration /
  max(forward+backward, disk), and the groups updated during backward (``--overlap-repeats``).

    python benchmarks/nvme_train.py --dir /nvme/scratch [--json]     (also: hetmem bench nvme-train)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.nvme.bench import measure_mixed
from hetmem.nvme.io_pool import IoBufferPool
from hetmem.nvme.replay import replay
from hetmem.train_job import state_bytes
from hetmem.units import format_bytes, parse_size


def add_model_arguments(p: argparse.ArgumentParser, dir_help: str | None) -> None:
    """The GPT, batch and budgets of the NVMe benchmarks (also benchmarks/nvme_pipeline_plan.py and
    disk_beside_compute.py); ``--dir`` too unless ``dir_help`` is None (a positional folder)."""
    if dir_help is not None:
        p.add_argument("--dir", default=None, help=dir_help)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--device-budget", default="64MiB")
    p.add_argument("--host-budget", default="384MiB")


def gpt_config(args) -> GPTConfig:
    """The GPT that ``add_model_arguments``' arguments describe (heads 64 wide, activation checkpointing)."""
    return GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=max(1, args.d_model // 64),
                     d_model=args.d_model, checkpoint=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, "folder for the swap space (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=4, help="steps after the warm-up step")
    p.add_argument("--disk-sample", default="1GiB", help="bytes moved by each mixed disk measurement")
    p.add_argument("--checksum-repeats", type=int, default=1,
                   help="passes over the batches comparing checksums on and off step by step; 0: none")
    p.add_argument("--checksum-engine", default="sync", choices=("sync", "waiting", "speculative"),
                   help="the step those two engines take (as in the overlap comparison): on a CPU device the "
                        "overlapped ones compute forward+backward beside the checksum workers")
    p.add_argument("--overlap-repeats", type=int, default=1,
                   help="passes over the batches comparing the synchronous, waiting and speculative steps "
                        "step by step; 0: none")
    p.add_argument("--chunk-size", default="auto", help="chunk_size: the NVMe pipeline's unit (elements, bytes, 'auto')")
    p.add_argument("--pipeline-depth", default="auto", help="nvme_pipeline_depth: groups the step reads ahead")
    p.add_argument("--spill-ahead", type=int, default=None,
                   help="nvme_spill_ahead: groups past the read-ahead whose room each update makes (default: its default)")
    p.add_argument("--lock-buffers", default="auto", choices=("auto", "required", "off"), help="nvme_lock_buffers")
    p.add_argument("--release-idle", default="auto", choices=("auto", "true", "false"),
                   help="nvme_release_idle: hand the IO pool's idle pages back for each backward")
    p.add_argument("--idle-poll-ms", type=float, default=0.0,
                   help="also measure how long nothing of each steady step's IO was in flight, polling every "
                        "this many ms (a diagnostic: the polling thread takes the GIL; 0: off)")
    p.add_argument("--json", action="store_true")
    return p


class RssSampler(threading.Thread):
    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.period = period
        self.peak = self.process.memory_info().rss
        self._halt = threading.Event()
        self._paused = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            if not self._paused.is_set():
                self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period)

    @contextlib.contextmanager
    def paused(self):
        """Samples are not taken inside (the replay's own buffers are not the engine's memory)."""
        self.peak = max(self.peak, self.process.memory_info().rss)
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def disk_mixed(directory: str, config: hetmem.Config, chunk_bytes: int, total: int) -> dict:
    """The disk's mixed read+write rate through buffers of the kind the engine's IO pool hands out
    (an IoBufferPool with the engine's settings: the same memory properties, not the same bytes)."""
    chunk_bytes = max(1 << 20, chunk_bytes)
    total = max(total // chunk_bytes, 4) * chunk_bytes
    pool = IoBufferPool(3 * chunk_bytes, lock=config.nvme_lock_buffers)
    buffers = [pool.take(chunk_bytes) for _ in range(3)]
    result = measure_mixed(directory, total_bytes=total, chunk_bytes=chunk_bytes, backend=config.nvme_backend,
                           block_size=config.nvme_block_size, queue_depth=config.nvme_queue_depth,
                           threads=config.nvme_threads, buffers=buffers)
    return {**result, "buffer_kind": pool.kind}


def replay_summary(replays: list[dict]) -> dict:
    """Medians over the replayed steps: the replay's rate (the step's disk rate), the steps' own rate,
    and the share of the disk the steps reached (step_vs_replay: replay time / step time, same bytes)."""
    if not replays:
        raise ValueError("no steady step moved NVMe bytes to replay; give --steps >= 1 and budgets that put "
                         "the optimizer state on NVMe")
    shares = [r["step_vs_replay"] for r in replays]
    return {"steps": len(replays), "bytes_per_s": statistics.median(r["bytes_per_s"] for r in replays),
            "seconds": statistics.median(r["seconds"] for r in replays),
            "step_s": statistics.median(r["step_s"] for r in replays),
            "step_bytes": statistics.median(r["step_bytes"] for r in replays),
            "step_bytes_per_s": statistics.median(r["step_bytes"] / r["step_s"] for r in replays),
            "requests": statistics.median(r["requests"] for r in replays),
            "max_inflight": max(r["max_inflight"] for r in replays),
            "step_vs_replay": statistics.median(shares), "step_vs_replay_range": [min(shares), max(shares)],
            "idle_share": None if replays[0]["idle_share"] is None else statistics.median(r["idle_share"] for r in replays),
            "buffer_kind": replays[0]["buffer_kind"]}


def step_disk(directory: str, config: hetmem.Config, records: list) -> dict:
    """The step's disk time: the recorded requests of one optimizer step replayed alone, at the engine's
    IO settings, through buffers of the kind its IO pool hands out (``replay``'s result)."""
    return replay(records, directory, backend=config.nvme_backend, block_size=config.nvme_block_size,
                  queue_depth=config.nvme_queue_depth, threads=config.nvme_threads, lock=config.nvme_lock_buffers)


def measure(args, progress=None) -> dict:
    directory = args.dir or tempfile.mkdtemp(prefix="hetmem-nvme-train-")
    os.makedirs(directory, exist_ok=True)
    cfg = gpt_config(args)
    chunk_size = int(args.chunk_size) if args.chunk_size.isdigit() else args.chunk_size
    depth = int(args.pipeline_depth) if args.pipeline_depth.isdigit() else args.pipeline_depth
    config = hetmem.Config(device="cpu", device_budget=args.device_budget, host_budget=args.host_budget,
                           nvme_dir=directory, dtype=args.dtype, memory_trace=False, chunk_size=chunk_size,
                           nvme_pipeline_depth=depth, nvme_lock_buffers=args.lock_buffers,
                           **({} if args.spill_ahead is None else {"nvme_spill_ahead": args.spill_ahead}),
                           nvme_release_idle={"auto": "auto", "true": True, "false": False}[args.release_idle],
                           overlap_step=False,  # the main run times the step alone (overlap_gain: both)
                           optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1))
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(data, args.batch_size, args.block_size, gen) for _ in range(args.steps + 1)]

    # the disk's figure at the engine's settings and the model's fp32 chunk size, before training
    with torch.device("meta"):
        probe_model = GPT(cfg)
    params = sum(p.numel() for p in {id(p): p for p in probe_model.parameters()}.values())
    del probe_model
    device_budget = parse_size(args.device_budget)
    chunk_guess = max(4096, device_budget // (8 * config.param_bytes)) * 4
    sample = parse_size(args.disk_sample)
    before = disk_mixed(directory, config, chunk_guess, sample)
    if progress:
        progress(f"disk mixed before: {before['total_bytes_per_s'] / 1e9:.2f} GB/s")

    sampler = RssSampler()
    baseline = sampler.peak
    sampler.start()

    def replay_now(records: list) -> dict:  # the step just recorded, before the next one
        with sampler.paused():
            return step_disk(directory, config, records)

    run = train(cfg, config, batches, replay_now, progress, idle_poll_s=args.idle_poll_ms / 1e3 or None)
    steps, init_s = run["steps"], run["init_s"]
    peak = sampler.stop()
    after = disk_mixed(directory, config, run["chunk_bytes"], sample)
    if progress:
        progress(f"disk mixed after: {after['total_bytes_per_s'] / 1e9:.2f} GB/s")
    replays = []
    for recorded in run["recorded_steps"]:
        replayed = recorded.pop("replayed")
        replays.append({**replayed, "step_s": recorded["seconds"], "step_bytes": recorded["io_bytes"],
                        "max_inflight": recorded["max_inflight"], "idle_s": recorded["idle_s"],
                        "idle_share": None if recorded["idle_s"] is None else recorded["idle_s"] / recorded["recorded_s"],
                        "step_vs_replay": replayed["seconds"] / recorded["seconds"]})  # the >= 90% target
        if progress:
            progress(f"step {recorded['step']}'s own requests replayed: {replayed['bytes'] / 1e9:.2f} GB in "
                     f"{replayed['seconds']:.2f} s (the step: {recorded['seconds']:.2f} s)")
    own = replay_summary(replays)
    checksums = checksum_cost(cfg, config, batches, args.checksum_repeats, progress, args.checksum_engine)
    mixed_rate = statistics.median([before["total_bytes_per_s"], after["total_bytes_per_s"]])
    disk_rate = own["bytes_per_s"]  # the step's disk time = its bytes / this (overlap_gain)
    overlap = overlap_gain(cfg, config, batches, args.overlap_repeats, disk_rate, progress)

    steady = [s for s in steps if not s["warmup"]]
    opt_rate = statistics.median(s["optimizer_io_bytes"] / s["optimizer_s"] for s in steady)
    budgets = parse_size(args.device_budget) + parse_size(args.host_budget)
    state = state_bytes(params, args.dtype)
    return {
        "benchmark": "nvme_train",
        "config": {"d_model": args.d_model, "layers": args.layers, "batch_size": args.batch_size,
                   "block_size": args.block_size, "dtype": args.dtype, "device_budget": args.device_budget,
                   "host_budget": args.host_budget, "nvme": {k: getattr(config, k) for k in
                   ("nvme_backend", "nvme_block_size", "nvme_queue_depth", "nvme_threads")}},
        "model": {"parameters": params, "state_bytes": state, "state_over_budgets": state / budgets,
                  "bytes_on_nvme_at_end": run["nvme_bytes"]},
        "memory": {"rss_baseline_bytes": baseline, "rss_peak_bytes": peak, "rss_above_baseline": peak - baseline,
                   "budgets_bytes": budgets, "overhead_bytes": peak - baseline - budgets},
        "time": {"init_s": init_s, "step_s_median": statistics.median(s["seconds"] for s in steady),
                 "optimizer_s_median": statistics.median(s["optimizer_s"] for s in steady)},
        "disk": {"mixed_before": before, "mixed_after": after, "mixed_bytes_per_s": mixed_rate,
                 "step_replay": own, "step_replays": replays},
        "optimizer_bytes_per_s": opt_rate, "optimizer_vs_disk_mixed": opt_rate / mixed_rate,
        "optimizer_vs_step_replay": opt_rate / disk_rate,
        "io_buffers": run["io_buffers"], "pipeline": run["pipeline"],
        "checksum": checksums,
        "overlap": overlap,
        "steps": steps,
    }


def train(cfg: GPTConfig, config: hetmem.Config, batches, replay_step, progress=None,
          idle_poll_s: float | None = None) -> dict:
    """One engine from scratch (meta-device model), a warm-up step and the steady steps (their swap
    requests recorded and ``replay_step(records)`` called right after each, its result kept as the
    step's ``replayed``; ``idle_poll_s``: and the time none was in flight)."""
    started = time.perf_counter()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    init_s = time.perf_counter() - started
    steps, recorded = [], []
    swap = engine.manager.nvme.swap
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        with swap.recording(idle_poll_s) if i > 0 else contextlib.nullcontext() as recorder:
            engine.step()
        result = engine.last_step
        if recorder is not None and recorder.records:
            recorded.append({"step": i, "requests": len(recorder.records),
                             "replayed": replay_step(recorder.records),
                             "seconds": result.seconds, "io_bytes": recorder.bytes(), "step_io_bytes": result.io_bytes,
                             "max_inflight": max(r.inflight for r in recorder.records),
                             "idle_s": recorder.idle_s, "recorded_s": recorder.elapsed_s})
        steps.append({"step": i, "warmup": i == 0, "seconds": time.perf_counter() - t0, "loss": loss.item(),
                      "optimizer_s": result.seconds, "optimizer_io_wait_s": result.io_wait_s,
                      "optimizer_compute_s": result.compute_s, "optimizer_io_bytes": result.io_bytes})
        if progress:
            progress(f"step {i}: {steps[-1]['seconds']:.1f} s (optimizer {result.seconds:.2f} s, "
                     f"{result.io_bytes / 1e9:.2f} GB moved; checksums {'on' if config.nvme_checksum else 'off'})")
    out = {"steps": steps, "init_s": init_s, "recorded_steps": recorded,
           "nvme_bytes": engine.manager.bytes_on(hetmem.Tier.NVME),
           "chunk_bytes": max(c.nbytes for c in engine.manager.chunks),
           "io_buffers": engine.manager.nvme.buffer_stats(),
           "pipeline": {"depth": engine.nvme_plan.depth, "group_bytes": engine.nvme_plan.group_bytes,
                        "groups": len(engine.layout.groups), "reason": engine.nvme_plan.reason,
                        # chunk capacity beyond the parameters the chunks hold, as a share of the parameters
                        "padding": sum(g.capacity for g in engine.layout.groups) / engine.layout.numel - 1.0}}
    engine.close(keep_weights=False)  # the weights are not needed, and may not fit in host memory
    return out


def engine_pair(cfg: GPTConfig, config: hetmem.Config, first_batch, key: str) -> dict:
    """Two engines from scratch with the boolean config ``key`` on and off (each in its own swap
    folder), after their warm-up step."""
    engines = {}
    for on in (True, False):
        with torch.device("meta"):
            model = GPT(cfg)
        folder = os.path.join(config.nvme_dir, f"{key}-{'on' if on else 'off'}")
        engines[on] = hetmem.initialize(model, config.replace(**{key: on}, nvme_dir=folder),
                                        init_fn=model.init_weights)
        step_once(engines[on], *first_batch)  # the warm-up step
    return engines


def checksum_cost(cfg: GPTConfig, config: hetmem.Config, batches, repeats: int, progress,
                  mode: str = "sync") -> dict:
    """Swap checksums' cost: two engines taking the ``mode`` step (``OVERLAP_MODES``), checksums on
    and off, stepped in turn on the same batches (the order alternating), so a load change hits
    both: the median of the paired iteration time ratios on/off, and the crc time the swap space
    counts as a share of the 'on' iterations: all of it (its worker threads) and the part the
    training thread computed itself (inline)."""
    if repeats <= 0:
        return {}
    engines = engine_pair(cfg, config.replace(**OVERLAP_MODES[mode]), batches[0], "nvme_checksum")
    ratios, shares, inline_shares = [], [], []
    for r in range(repeats):
        for i, (x, y) in enumerate(batches[1:]):
            seconds, crc = {}, {}
            for on in ((True, False) if (r + i) % 2 == 0 else (False, True)):
                swap = engines[on].manager.nvme.swap
                stats0, t0 = dict(swap.stats), time.perf_counter()
                step_once(engines[on], x, y)
                seconds[on] = time.perf_counter() - t0
                crc = {k: swap.stats[k] - stats0[k] for k in ("checksum_seconds", "checksum_inline_seconds")} \
                    if on else crc
            ratios.append(seconds[True] / seconds[False])
            shares.append(crc["checksum_seconds"] / seconds[True])
            inline_shares.append(crc["checksum_inline_seconds"] / seconds[True])
        if progress:
            progress(f"checksum comparison, repeat {r + 1}: median on/off so far {statistics.median(ratios):.3f}")
    algorithm = engines[True].manager.nvme.swap.checksum_algorithm
    for engine in engines.values():
        engine.close(keep_weights=False)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"algorithm": algorithm, "engine": mode, "pairs": len(ratios), "ratio_on_off_median": statistics.median(ratios),
            "ratio_on_off_quartiles": [q[0], q[2]], "crc_share_of_step_median": statistics.median(shares),
            "crc_inline_share_of_step_median": statistics.median(inline_shares)}


OVERLAP_MODES = {  # the overlap comparison's engines: config overrides (README "Overlapped optimizer step")
    "sync": {"overlap_step": False},                                   # the whole step in engine.step()
    "waiting": {"overlap_step": True, "step_speculation": False},      # the next forward waits per group
    "speculative": {"overlap_step": True, "step_speculation": True},   # + the last groups during backward
}


def step_disk_s(bytes_per_step: int, disk_rate: float) -> float:
    """The step's disk time: its bytes (read + written) over the disk's mixed rate."""
    return bytes_per_step / disk_rate


def overlap_gain(cfg: GPTConfig, config: hetmem.Config, batches, repeats: int, disk_rate: float,
                 progress) -> dict:
    """The overlapped step's gain: three engines (``OVERLAP_MODES``) stepped in turn on the same
    batches, the order rotating each step, so a load change hits all.  Per step and engine:
    forward+backward seconds, step() seconds, their sum (the iteration), the groups speculation
    updated during backward and rolled back.  The target ratio is the iteration over
    max(forward+backward, the step's disk time), both from the synchronous engine.  Where the
    compute device is this CPU, forward+backward and the step's own CPU work (the Adam kernels,
    the bookkeeping: the synchronous step's main-thread seconds not blocked on transfers) share
    its cores and cannot overlap, so the iteration is also given over max(forward+backward + that
    work, disk): how far it is from what this machine allows (``shared_cpu_ratio``)."""
    if repeats <= 0:
        return {}
    engines = {}
    for mode, overrides in OVERLAP_MODES.items():
        with torch.device("meta"):
            model = GPT(cfg)
        folder = os.path.join(config.nvme_dir, f"overlap-{mode}")
        engines[mode] = hetmem.initialize(model, config.replace(**overrides, nvme_dir=folder),
                                          init_fn=model.init_weights)
        step_once(engines[mode], *batches[0])  # the warm-up step
    modes = list(OVERLAP_MODES)
    rows = {mode: [] for mode in modes}
    n = 0
    for r in range(repeats):
        for x, y in batches[1:]:
            for mode in modes[n % 3:] + modes[:n % 3]:
                engine = engines[mode]
                rolled = engine.adam.speculation.rolled_back
                t0 = time.perf_counter()
                engine.backward(engine(x, y))  # overlapped: the previous step is applied in here
                t1 = time.perf_counter()
                previous = engine.adam.last_result  # the step before this one, applied by now
                engine.step()
                t2 = time.perf_counter()
                rows[mode].append({"fwd_bwd_s": t1 - t0, "step_call_s": t2 - t1, "total_s": t2 - t0,
                                   "speculated": engine.adam.speculation.last_speculated,
                                   "rolled_back": engine.adam.speculation.rolled_back - rolled,
                                   # the previous step's main-thread seconds, of which blocked on transfers
                                   # and in the Adam kernels (speculation's included)
                                   "step_work_s": previous.seconds, "step_blocked_s": previous.io_wait_s,
                                   "step_kernels_s": previous.compute_s})
            n += 1
        if progress:
            progress("overlap comparison, repeat {}: iteration {}".format(
                r + 1, ", ".join(f"{m} {median(rows[m], 'total_s'):.2f} s" for m in modes)))
    bytes_per_step = {}
    for mode, engine in engines.items():
        bytes_per_step[mode] = engine.last_step.io_bytes  # finishes the last pending step
        groups = sum(g.trainable for g in engine.layout.groups)
        engine.close(keep_weights=False)
    fwd_bwd, disk = median(rows["sync"], "fwd_bwd_s"), step_disk_s(bytes_per_step["sync"], disk_rate)
    step_cpu = statistics.median(max(0.0, row["step_work_s"] - row["step_blocked_s"]) for row in rows["sync"])
    shared = torch.device(config.device).type == "cpu"  # forward+backward run on the same cores as the Adam
    out = {"pairs": len(rows["sync"]), "groups": groups, "fwd_bwd_s": fwd_bwd, "disk_s": disk,
           "step_cpu_s": step_cpu, "cpu_shared": shared,
           "disk_bytes_per_step": bytes_per_step["sync"], "modes": {}, "rows": rows}
    for mode in modes:
        ratios = [a["total_s"] / b["total_s"] for a, b in zip(rows[mode], rows["sync"])]
        out["modes"][mode] = {
            "iteration_s": median(rows[mode], "total_s"), "fwd_bwd_s": median(rows[mode], "fwd_bwd_s"),
            "step_call_s": median(rows[mode], "step_call_s"), "ratio_to_sync_median": statistics.median(ratios),
            "target_ratio": median(rows[mode], "total_s") / max(fwd_bwd, disk),
            "shared_cpu_ratio": median(rows[mode], "total_s") / max(fwd_bwd + step_cpu, disk) if shared else None,
            "speculated_groups_median": median(rows[mode], "speculated"),
            "step_work_s": median(rows[mode], "step_work_s"), "step_blocked_s": median(rows[mode], "step_blocked_s"),
            "step_kernels_s": median(rows[mode], "step_kernels_s"),
            "rolled_back_groups": sum(row["rolled_back"] for row in rows[mode]),
            "disk_bytes_last_step": bytes_per_step[mode]}
    return out


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def step_once(engine, x, y) -> None:
    engine.backward(engine(x, y))
    engine.step()


def table(r: dict) -> str:
    m, mem, t = r["model"], r["memory"], r["time"]
    cfg = r["config"]
    return "\n".join([
        f"GPT d_model {cfg['d_model']} x {cfg['layers']} layers: {m['parameters']:,} parameters, {cfg['dtype']}; "
        f"parameters + Adam state {format_bytes(m['state_bytes'])} = {m['state_over_budgets']:.1f}x "
        f"(device {cfg['device_budget']} + host {cfg['host_budget']})",
        f"RSS: baseline {format_bytes(mem['rss_baseline_bytes'])}, peak {format_bytes(mem['rss_peak_bytes'])}: "
        f"{format_bytes(mem['rss_above_baseline'])} above baseline for {format_bytes(mem['budgets_bytes'])} of "
        f"budgets (overhead {format_bytes(mem['overhead_bytes'])})",
        f"time: init {t['init_s']:.1f} s, {t['step_s_median']:.2f} s/step, optimizer {t['optimizer_s_median']:.2f} s",
        f"pipeline: {r['pipeline']['groups']} chunk groups of up to {format_bytes(r['pipeline']['group_bytes'])}, "
        f"{r['pipeline']['depth']} read ahead ({r['pipeline']['reason']}); chunk padding {r['pipeline']['padding']:.3%}",
        disk_lines(r),
        f"IO buffer pool: {format_bytes(r['io_buffers']['capacity'])}, peak {format_bytes(r['io_buffers']['peak_in_use'])}"
        f" in use, {r['io_buffers']['takes']} payloads handed out, {r['io_buffers']['defragment_spills']} "
        f"defragmenting spills, {r['io_buffers']['outside_pool']} outside the pool",
        checksum_line(r["checksum"]),
        overlap_line(r["overlap"]),
    ])


def disk_lines(r: dict) -> str:
    d, kind = r["disk"], r["io_buffers"]["kind"]
    own = d["step_replay"]
    low, high = own["step_vs_replay_range"]
    return "\n".join([
        f"the step's own IO ({own['requests']:.0f} requests, {own['step_bytes'] / 1e9:.2f} GB, up to {own['max_inflight']} "
        f"in flight; medians of {own['steps']} steady steps, each replayed alone right after it): "
        f"{own['step_s']:.2f} s in the step = {own['step_bytes_per_s'] / 1e9:.2f} GB/s [{kind}]; replayed "
        f"{own['seconds']:.2f} s = {own['bytes_per_s'] / 1e9:.2f} GB/s [{own['buffer_kind']}] -> the step "
        f"reached {own['step_vs_replay']:.0%} ({low:.0%}-{high:.0%}) of the disk under its own pattern (target >= 90%)"
        + ("" if own.get("idle_share") is None else f"; nothing of it in flight {own['idle_share']:.0%} of the step"),
        f"optimizer step moves {r['optimizer_bytes_per_s'] / 1e9:.2f} GB/s [{kind}] (median of the steady steps): "
        f"{r['optimizer_vs_step_replay']:.0%} of the replay's rate; disk mixed read+write (2+2 chunk-sized requests "
        f"in flight) {d['mixed_bytes_per_s'] / 1e9:.2f} GB/s [{d['mixed_before']['buffer_kind']}] (median of "
        f"before/after) -> {r['optimizer_vs_disk_mixed']:.0%} of that generic figure"])


def overlap_line(o: dict) -> str:
    if not o:
        return "overlapped step: not compared (--overlap-repeats 0)"
    lines = [f"overlapped step ({o['pairs']} steps per engine, rotating order, medians): forward+backward "
             f"{o['fwd_bwd_s']:.2f} s, the step's disk time {o['disk_s']:.2f} s "
             f"({o['disk_bytes_per_step'] / 1e9:.2f} GB) (sync engine)"
             + (f"; the step's own CPU work {o['step_cpu_s']:.2f} s shares the cores with forward+backward here "
                f"(the device is this CPU)" if o.get("cpu_shared") else "")]
    for mode, m in o["modes"].items():
        lines.append(f"  {mode:<11} iteration {m['iteration_s']:.2f} s (fwd+bwd {m['fwd_bwd_s']:.2f} s, step() "
                     f"{m['step_call_s']:.2f} s), paired /sync {m['ratio_to_sync_median']:.3f}, / max(fwd+bwd, disk) "
                     f"= {m['target_ratio']:.2f}"
                     + (f" (/ max(fwd+bwd + step CPU, disk) = {m['shared_cpu_ratio']:.2f})"
                        if m.get("shared_cpu_ratio") is not None else "")
                     + f"; groups updated during backward {m['speculated_groups_median']:g} "
                     f"of {o['groups']}, rolled back {m['rolled_back_groups']}; the step's main-thread work "
                     f"{m['step_work_s']:.2f} s (blocked {m['step_blocked_s']:.2f} s, Adam {m['step_kernels_s']:.2f} s)")
    return "\n".join(lines)


def checksum_line(c: dict) -> str:
    if not c:
        return "swap checksums: not compared (--checksum-repeats 0)"
    return (f"swap checksums ({c['algorithm']}, {c.get('engine', 'sync')} step): iteration time on/off "
            f"{c['ratio_on_off_median']:.3f} (median of "
            f"{c['pairs']} paired steps, quartiles {c['ratio_on_off_quartiles'][0]:.3f}-"
            f"{c['ratio_on_off_quartiles'][1]:.3f}); {c['algorithm']} itself {c['crc_share_of_step_median']:.2%} of "
            f"the step on the swap space's worker threads, {c['crc_inline_share_of_step_median']:.2%} on the "
            f"training thread")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = None if args.json else (lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    result = measure(args, progress)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
