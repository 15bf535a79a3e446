"""The NVMe IO buffer pool: its limits, alignment, fault-in, locking and its fallback, byte-exact IO."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hetmem.nvme import SwapSpace
from hetmem.nvme.io_pool import HUGE_PAGE, PAGE, IoBufferPool, MemlockError, memlock_limit

ROOT = Path(__file__).resolve().parents[2]
KiB = 1024


def resident_pages(pool: IoBufferPool) -> int:
    """Pages of the pool's region in memory, by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = pool.capacity // PAGE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(pool.address), ctypes.c_size_t(pool.capacity), vec) == 0
    return sum(v & 1 for v in vec)


def locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


@pytest.mark.parametrize("numel,dtype", [(1, torch.uint8), (7, torch.float32), (1023, torch.bfloat16),
                                         (4097, torch.float16), ((1 << 18) + 3, torch.float32)])
def test_blocks_are_page_aligned_and_own_whole_pages(numel, dtype):
    pool = IoBufferPool(4 << 20, lock="off")
    t = pool.take(numel, dtype)
    assert t.dtype is dtype and t.numel() == numel and t.is_contiguous()
    assert t.data_ptr() % PAGE == 0
    owned = pool.owned_bytes(t)
    assert owned % PAGE == 0 and numel * t.element_size() <= owned < numel * t.element_size() + PAGE
    assert pool.address <= t.data_ptr() and t.data_ptr() + owned <= pool.address + pool.capacity


def test_bytes_handed_out_never_exceed_the_capacity_and_blocks_do_not_overlap():
    pool = IoBufferPool(1 << 20, lock="off")
    held, sizes = [], [12 * KiB, 40 * KiB, 4 * KiB, 100 * KiB, 64 * KiB]
    while True:
        t = pool.take(sizes[len(held) % len(sizes)])
        if t is None:
            break
        held.append(t)
        assert pool.in_use <= pool.capacity
    assert pool.refusals == 1 and pool.in_use <= pool.capacity
    spans = sorted((t.data_ptr(), t.data_ptr() + pool.owned_bytes(t)) for t in held)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert sum(end - start for start, end in spans) == pool.in_use


def test_blocks_are_reused_from_the_one_region_and_views_keep_them():
    pool = IoBufferPool(256 * KiB, lock="off")
    address = pool.address
    first = pool.take(64 * KiB)
    ptr = first.data_ptr()
    view = first[100:200]
    del first
    assert pool.in_use == 64 * KiB, "a live view must keep its block out of the free list"
    assert pool.take(256 * KiB) is None
    del view
    assert pool.in_use == 0
    for _ in range(50):  # steps: the same bytes again and again, nothing new mapped
        again = pool.take(64 * KiB)
        assert again.data_ptr() == ptr
        del again
    assert pool.address == address and pool.takes == 51
    whole = pool.take(256 * KiB)  # freed ranges coalesce
    assert whole is not None and whole.data_ptr() == address


def test_prefault_puts_every_page_in_memory():
    assert resident_pages(IoBufferPool(8 << 20, lock="off")) == (8 << 20) // PAGE
    lazy = IoBufferPool(8 << 20, prefault=False, lock="off")
    assert resident_pages(lazy) < (8 << 20) // PAGE
    assert "prefaulted" not in lazy.kind


def test_lock_locks_the_region_when_the_limit_allows():
    size = 2 << 20
    limit = memlock_limit()
    if os.geteuid() != 0 and limit is not None and limit < size + locked_kib() * KiB:
        pytest.skip(f"RLIMIT_MEMLOCK ({limit} B) is below {size} B here")
    before = locked_kib()
    pool = IoBufferPool(size, lock="required")
    assert pool.kind.endswith("locked")
    assert locked_kib() - before >= size // KiB
    off = IoBufferPool(size, lock="off")
    assert "locked" not in off.kind


# A child process under a lowered RLIMIT_MEMLOCK (and without CAP_IPC_LOCK, which root holds and
# which ignores the limit): "auto" falls back once with the fix, "required" raises.
_CHILD = textwrap.dedent("""
    import ctypes, json, logging, os, resource, sys
    sys.path.insert(0, sys.argv[1])

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) == 0:
        data[0].effective &= ~(1 << 14)   # CAP_IPC_LOCK
        data[0].permitted &= ~(1 << 14)
        libc.capset(ctypes.byref(header), data)
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, hard))

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.levelname + " " + record.getMessage())
    logging.getLogger("hetmem").addHandler(handler)
    from hetmem.nvme.io_pool import IoBufferPool, MemlockError
    kinds = [IoBufferPool(4 << 20, lock="auto").kind for _ in range(3)]
    try:
        IoBufferPool(4 << 20, lock="required")
        required = None
    except MemlockError as exc:
        required = str(exc)
    print(json.dumps({"kinds": kinds, "records": records, "required": required}))
""")


def test_memlock_refused_falls_back_once_with_the_fix_or_raises_when_required():
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all("locked" not in k and "prefaulted" in k for k in result["kinds"]), result["kinds"]
    warnings = [r for r in result["records"] if r.startswith("WARNING")]
    assert len(warnings) == 1, result["records"]
    assert "ulimit -l" in warnings[0] and "nvme_lock_buffers='off'" in warnings[0]
    assert "continuing with unlocked buffers" in warnings[0]
    assert result["required"] is not None and "nvme_lock_buffers='required'" in result["required"]
    assert "ulimit -l" in result["required"]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="capacity=0"):
        IoBufferPool(0)
    with pytest.raises(ValueError, match="nvme_lock_buffers='always'"):
        IoBufferPool(PAGE, lock="always")
    assert issubclass(MemlockError, OSError)


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 65536 + 17, (1 << 20) + 3])
def test_io_through_pool_blocks_is_byte_exact(tmp_path, nbytes):
    pool = IoBufferPool(4 << 20, lock="off")
    data = pool.take(nbytes)
    data.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes)))
    with SwapSpace(tmp_path, {"a": nbytes, "b": nbytes}, owned_bytes=pool.owned_bytes) as swap:
        swap.store("a", data).wait()
        swap.store("b", data).wait()
        back = pool.take(nbytes)
        back.fill_(0)
        swap.load("a", into=back).wait()
        assert torch.equal(back, data)
        plain = torch.zeros(nbytes, dtype=torch.uint8)  # a buffer from elsewhere still reads exactly
        swap.load("b", into=plain).wait()
        assert torch.equal(plain, data)



@pytest.mark.parametrize("lock", ["auto", "off"])
def test_release_idle_drops_free_pages_and_take_faults_them_back(tmp_path, lock):
    MiB = 1 << 20
    pool = IoBufferPool(16 * MiB, lock=lock)
    assert pool.address % HUGE_PAGE == 0, "the region starts on a huge page, so blocks own whole ones"
    locked = "locked" in pool.kind
    kept = pool.take(6 * MiB)
    kept.copy_(torch.randint(0, 256, (6 * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    copy = kept.clone()
    small = pool.take(PAGE)  # a 4 KiB block: the free range after it starts mid-huge-page
    before, lck = resident_pages(pool), locked_kib()
    released = pool.release_idle()
    # the free range [6 MiB + 4 KiB, 16 MiB) holds four whole huge pages: [8, 16) MiB
    assert released == 8 * MiB and pool.released_bytes == 8 * MiB and pool.releases == 1
    assert resident_pages(pool) == before - released // PAGE
    if locked:
        assert lck - locked_kib() == released // KiB
    assert torch.equal(kept, copy), "a block handed out must keep its bytes"
    assert pool.release_idle() == 0 and pool.releases == 1, "released pages are not released twice"

    rest = 10 * MiB - PAGE
    back = pool.take(rest)  # [6 MiB + 4 KiB, 16 MiB): every released page
    assert pool.refaulted == 8 * MiB and pool.released_bytes == 0
    assert resident_pages(pool) == pool.capacity // PAGE, "a block is resident when it is handed out"
    if locked:
        assert locked_kib() == lck
    back.copy_(torch.randint(0, 256, (rest,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    with SwapSpace(tmp_path, {"a": rest}, owned_bytes=pool.owned_bytes) as swap:
        swap.store("a", back).wait()
        again = back.clone()
        back.fill_(0)
        swap.load("a", into=back).wait()
    assert torch.equal(back, again)
    del small


def test_release_idle_leaves_short_free_ranges_and_closed_pools_alone():
    MiB = 1 << 20
    pool = IoBufferPool(4 * MiB, lock="off")
    held = pool.take(3 * MiB)
    assert pool.release_idle() == 0, "1 MiB free holds no whole huge page"
    assert pool.release_idle(min_bytes=8 * MiB) == 0
    del held
    assert pool.release_idle(min_bytes=8 * MiB) == 0, "a range shorter than min_bytes is kept"
    assert pool.release_idle() == 4 * MiB
    pool.close()
    assert pool.release_idle() == 0


def test_a_refused_relock_faults_the_pages_in_unlocked_and_says_so_once(monkeypatch, caplog):
    from hetmem.nvme import io_pool

    MiB = 1 << 20
    pool = IoBufferPool(8 * MiB, lock="auto")
    if "locked" not in pool.kind:
        pytest.skip("mlock is refused here: the pool is unlocked from the start")
    assert pool.release_idle() == 8 * MiB

    class Refusing:  # libc whose mlock fails from now on (another region took the rest of the limit)
        def __init__(self, libc):
            self._libc = libc

        def mlock(self, address, length):
            ctypes.set_errno(12)  # ENOMEM
            return -1

        def __getattr__(self, name):
            return getattr(self._libc, name)

    monkeypatch.setattr(io_pool, "_libc", Refusing(io_pool._lib()))
    monkeypatch.setattr(io_pool, "_lock_warned", False)
    with caplog.at_level("WARNING", logger="hetmem.nvme.io_pool"):
        block = pool.take(4 * MiB)
        block.fill_(5)
        assert pool.release_idle() == 0  # 4 MiB free, already released
        other = pool.take(4 * MiB)
    assert resident_pages(pool) == pool.capacity // PAGE, "refused locking must still fault the block in"
    assert pool.refaulted == 8 * MiB and pool.released_bytes == 0
    assert int(block.sum()) == 5 * 4 * MiB and other.numel() == 4 * MiB
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ulimit -l" in warnings[0].getMessage()


def test_a_pool_locked_as_required_keeps_its_pages():
    limit = memlock_limit()
    if os.geteuid() != 0 and limit is not None and limit < (4 << 20) + locked_kib() * KiB:
        pytest.skip(f"RLIMIT_MEMLOCK ({limit} B) is below 4 MiB here")
    pool = IoBufferPool(4 << 20, lock="required")
    assert pool.release_idle() == 0 and resident_pages(pool) == pool.capacity // PAGE


def test_an_unlocked_pool_faults_released_huge_pages_back_whole():
    """Touching one 4 KiB page of a released huge page brings the whole of it back: the pool's
    figures must say so, and a later release must drop it whole again."""
    MiB = 1 << 20
    pool = IoBufferPool(8 * MiB, lock="off")
    assert pool.release_idle() == 8 * MiB and resident_pages(pool) == 0
    small = pool.take(PAGE)
    assert pool.refaulted == 2 * MiB and pool.released_bytes == 6 * MiB
    assert resident_pages(pool) * PAGE <= 2 * MiB
    del small
    assert pool.release_idle() == 2 * MiB and pool.released_bytes == 8 * MiB
    assert resident_pages(pool) == 0, "every page the pool counts as released is out of memory"


def test_an_unprefaulted_pool_does_not_count_pages_it_never_faulted():
    MiB = 1 << 20
    pool = IoBufferPool(4 * MiB, prefault=False, lock="off")
    assert pool.release_idle() == 4 * MiB
    block = pool.take(MiB)
    assert pool.refaulted == 0 and pool.released_bytes == 2 * MiB, "pages fault in with use there"
    block.fill_(1)
    assert int(block.sum()) == MiB
