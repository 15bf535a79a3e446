// io_uring backend through the raw syscalls and the kernel's own header: no liburing.
//
// One ring per queue.  Submitters (any thread, holding the File's mutex) write SQEs and
// call io_uring_enter; one reaper thread per ring waits for CQEs and hands them to the
// File.  The SQ and CQ have separate single writers, so the only synchronisation with the
// kernel is the acquire/release on the ring indices.
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "queue.h"

#if defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#define HETMEM_HAVE_IO_URING 1
#endif
#endif

namespace hetmem::aio {

#ifdef HETMEM_HAVE_IO_URING

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif

namespace {

int uring_setup(unsigned entries, io_uring_params* p) { return int(syscall(__NR_io_uring_setup, entries, p)); }

int uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return int(syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

class UringQueue final : public Queue {
 public:
  UringQueue(File& file, int depth) : Queue(file, depth) {
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    ring_fd_ = uring_setup(unsigned(depth), &p);
    if (ring_fd_ < 0) throw SystemError(errno, "io_uring_setup failed: " + errno_text(errno));
    try {
      map_rings(p);
    } catch (...) {
      unmap();
      throw;
    }
  }

  ~UringQueue() override {
    stop();
    unmap();
  }

  int submit(Task** tasks, int n, int* err) override {
    unsigned tail = *sq_tail_;  // only submitters (serialised by the File's mutex) write it
    for (int i = 0; i < n; ++i) {
      Task* t = tasks[i];
      unsigned index = tail & *sq_mask_;
      io_uring_sqe* sqe = &sqes_[index];
      std::memset(sqe, 0, sizeof *sqe);
      sqe->opcode = t->op == Op::Read ? IORING_OP_READ : IORING_OP_WRITE;
      sqe->fd = file_.fd();
      sqe->addr = reinterpret_cast<uint64_t>(t->buf + t->done);
      sqe->len = uint32_t(t->length - t->done);
      sqe->off = t->offset + t->done;
      sqe->user_data = reinterpret_cast<uint64_t>(t);
      sq_array_[index] = index;
      ++tail;
    }
    __atomic_store_n(sq_tail_, tail, __ATOMIC_RELEASE);
    int submitted = 0;
    while (submitted < n) {
      int r = uring_enter(ring_fd_, unsigned(n - submitted), 0, 0);
      if (r >= 0) {
        submitted += r;
        continue;
      }
      if (errno == EINTR) continue;
      // Nothing of this call was consumed: take the rest back out of the ring (EAGAIN and
      // EBUSY too: File::submit_to retries them, bounded).
      *err = errno;
      __atomic_store_n(sq_tail_, tail - unsigned(n - submitted), __ATOMIC_RELEASE);
      break;
    }
    if (submitted > 0) wake_.notify_one();
    return submitted;
  }

  void start() override { reaper_ = std::thread([this] { reap(); }); }

  void stop() override {
    {
      std::lock_guard<std::mutex> lock(file_.mutex());
      stopping_ = true;
    }
    wake_.notify_all();
    if (reaper_.joinable()) reaper_.join();
  }

 private:
  void map_rings(const io_uring_params& p) {
    sq_len_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    bool single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single) sq_len_ = cq_len_ = std::max(sq_len_, cq_len_);
    sq_ring_ = mmap(nullptr, sq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd_, IORING_OFF_SQ_RING);
    if (sq_ring_ == MAP_FAILED) throw SystemError(errno, "mmap of the io_uring SQ ring failed: " + errno_text(errno));
    if (single) {
      cq_ring_ = sq_ring_;
    } else {
      cq_ring_ = mmap(nullptr, cq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd_, IORING_OFF_CQ_RING);
      if (cq_ring_ == MAP_FAILED) throw SystemError(errno, "mmap of the io_uring CQ ring failed: " + errno_text(errno));
    }
    sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
    void* sqes = mmap(nullptr, sqes_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd_, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) throw SystemError(errno, "mmap of the io_uring SQEs failed: " + errno_text(errno));
    sqes_ = static_cast<io_uring_sqe*>(sqes);
    char* sq = static_cast<char*>(sq_ring_);
    char* cq = static_cast<char*>(cq_ring_);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_mask_ = reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
  }

  void unmap() {
    if (sqes_ != nullptr) munmap(sqes_, sqes_len_);
    if (cq_ring_ != nullptr && cq_ring_ != MAP_FAILED && cq_ring_ != sq_ring_) munmap(cq_ring_, cq_len_);
    if (sq_ring_ != nullptr && sq_ring_ != MAP_FAILED) munmap(sq_ring_, sq_len_);
    sqes_ = nullptr;
    sq_ring_ = cq_ring_ = nullptr;
    if (ring_fd_ >= 0) ::close(ring_fd_);
    ring_fd_ = -1;
  }

  void reap() {
    std::vector<Task*> tasks(slots_.size());
    std::vector<int64_t> results(slots_.size());
    for (;;) {
      int injected;
      {
        std::unique_lock<std::mutex> lock(file_.mutex());
        wake_.wait(lock, [&] { return stopping_ || inflight > 0; });
        if (inflight == 0) return;  // stopping, and nothing left to reap
        injected = file_.reap_fault();
      }
      unsigned head = *cq_head_;  // only this thread writes it
      unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
      if (head == tail || injected) {
        // Sleep in the kernel until at least one IO completes.
        int r = injected ? -1 : uring_enter(ring_fd_, 0, 1, IORING_ENTER_GETEVENTS);
        if (r < 0 && reap_failed(injected ? injected : errno)) return;
        if (r >= 0) reaped();
        continue;
      }
      reaped();
      size_t n = 0;
      for (; head != tail && n < tasks.size(); ++head, ++n) {
        const io_uring_cqe& cqe = cqes_[head & *cq_mask_];
        tasks[n] = reinterpret_cast<Task*>(cqe.user_data);
        results[n] = cqe.res;
      }
      __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
      std::lock_guard<std::mutex> lock(file_.mutex());
      for (size_t i = 0; i < n; ++i) file_.complete(tasks[i], results[i]);
      file_.fill(this);
    }
  }

  int ring_fd_ = -1;
  void* sq_ring_ = nullptr;
  void* cq_ring_ = nullptr;
  size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
  unsigned *sq_tail_ = nullptr, *sq_mask_ = nullptr, *sq_array_ = nullptr;
  unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr, *cq_mask_ = nullptr;
  std::thread reaper_;
};

}  // namespace

std::unique_ptr<Queue> make_uring_queue(File& file, int depth) { return std::make_unique<UringQueue>(file, depth); }

std::string uring_unavailable_reason() {
  io_uring_params p;
  std::memset(&p, 0, sizeof p);
  int fd = uring_setup(1, &p);
  if (fd < 0) return "io_uring_setup failed: " + errno_text(errno);
  ::close(fd);
  return "";
}

#else  // no <linux/io_uring.h> at build time

std::unique_ptr<Queue> make_uring_queue(File&, int) {
  throw SystemError(ENOSYS, "io_uring support was not compiled in (no <linux/io_uring.h> when the op was built)");
}

std::string uring_unavailable_reason() {
  return "not compiled in (no <linux/io_uring.h> when the op was built)";
}

#endif

}  // namespace hetmem::aio
