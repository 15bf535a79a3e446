"""No accelerator: the "device" is host memory under an accounted budget."""
from __future__ import annotations

import concurrent.futures

import torch

from .base import Accelerator, CopyEvent


class FutureEvent:
    """A copy run by a worker thread; its future is the event."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def query(self) -> bool:
        return self._future.done()

    def synchronize(self) -> None:
        self._future.result()   # raises what the copy raised


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` returning nothing: a finished future must not keep ``dst`` alive."""
    dst.copy_(src)


class WorkerStream:
    """One worker thread that runs copies in order (copies release the GIL)."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetmem-mover")


class HostAccelerator(Accelerator):
    name = "cpu"
    device = torch.device("cpu")
    separate_memory = False
    pin_host = False

    def copy_stream(self) -> WorkerStream:
        return WorkerStream()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: WorkerStream, label: str = "") -> CopyEvent:
        return FutureEvent(stream.pool.submit(_copy, dst, src))

    def close_stream(self, stream: WorkerStream) -> None:
        stream.pool.shutdown(wait=True)
