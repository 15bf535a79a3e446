// Internal to the engine: requests, the IOs (tasks) they are cut into, and the queue
// interface each backend implements.  See engine.h for the model.
#pragma once

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "engine.h"

namespace hetmem::aio {

struct Request {
  uint64_t id = 0;
  Op op = Op::Read;
  char* user = nullptr;     // caller memory
  uint64_t offset = 0;      // file range as asked
  uint64_t length = 0;
  bool staged = false;      // memory, offset or length unaligned for O_DIRECT
  uint64_t cursor = 0;      // next file byte to cut into an IO
  uint64_t end = 0;         // where cutting stops (the aligned span's end when staged)
  uint32_t inflight = 0;    // IOs cut and not yet finished
  bool failed = false;
  bool extends_file = false;  // a read-modify-write piece ran past the end of the file
  RequestStatus status;
};

// One IO.  A queue owns `queue_depth` of them; a free one is cut from a request, issued,
// completed and returned.  The queue issues (buf + done, length - done) at offset + done.
struct Task {
  enum class Stage { Direct, StagedRead, RmwRead, StagedWrite };

  Queue* queue = nullptr;
  Request* req = nullptr;
  Stage stage = Stage::Direct;
  Op op = Op::Read;            // what the kernel is asked to do now
  char* buf = nullptr;         // caller memory (Direct) or the staging buffer
  uint64_t offset = 0;         // file offset of buf[0]
  uint64_t length = 0;         // bytes of this IO
  uint64_t done = 0;           // bytes moved so far (partial completions)
  uint64_t user_begin = 0;     // staged: the caller's bytes inside [offset, offset+length)
  uint64_t user_end = 0;
  uint64_t lock_head = kNoUnit;  // staged write: edge units held (aligned unit index)
  uint64_t lock_tail = kNoUnit;
  bool locks_held = false;
  bool final_result = false;   // injected short: do not resubmit
  bool unissued = false;       // handed to File::submit_to and not yet accepted by the kernel
  char* staging = nullptr;     // this slot's staging buffer, allocated on first use
  void* backend_data = nullptr;  // per-backend slot data (an iocb)

  static constexpr uint64_t kNoUnit = ~uint64_t(0);
};

// A set of IO slots plus whatever executes them.  All members are guarded by the File's
// mutex; submit() is called with it held and must not block on completions.
class Queue {
 public:
  Queue(File& file, int depth) : file_(file), slots_(depth) {
    for (auto& t : slots_) {
      t.queue = this;
      free_.push_back(&t);
    }
  }
  virtual ~Queue() = default;

  // Issue `n` prepared tasks, once (EINTR is retried).  Returns how many were accepted; when
  // fewer, sets *err (EAGAIN/EBUSY included: File::submit_to bounds the retries, see
  // kTransientRetries) and leaves the rest unissued.
  virtual int submit(Task** tasks, int n, int* err) = 0;
  // Start the completion thread(s) / stop them once nothing is in flight.
  virtual void start() = 0;
  virtual void stop() = 0;

  std::vector<Task*>& free_slots() { return free_; }
  std::vector<Task>& slots() { return slots_; }
  void wake() { wake_.notify_all(); }
  int inflight = 0;  // tasks submitted and not completed (guarded by the File's mutex)
  int broken = 0;    // errno of a persistent reaper error: every IO given to this queue fails with it
  bool submitting = false;       // a submitter is retrying EAGAIN/EBUSY without the File's mutex
  std::vector<Task*> backlog;    // tasks given to this queue meanwhile: that submitter issues them

  // The reaper's wait for completions failed with `err` (called without the File's mutex).
  // EINTR is retried at once, EAGAIN/EBUSY after a kTransientPause pause up to
  // kTransientRetries times in a row (about 1 s; submission is bounded the same way); any other errno, or transient ones that do not stop, are persistent: the
  // queue's IOs fail with an OSError naming the errno and the reaper exits.  Returns true
  // when the reaper must exit.  (Kernel IOs still in flight then finish or are cancelled
  // when the queue is torn down at close(); their requests are already reported failed.)
  bool reap_failed(int err) {
    if (err == EINTR) return false;
    if ((err == EAGAIN || err == EBUSY) && ++transient_errors_ <= kTransientRetries) {
      std::this_thread::sleep_for(kTransientPause);
      return false;
    }
    std::lock_guard<std::mutex> lock(file_.mutex());
    file_.fail_queue(this, err);
    return true;
  }
  void reaped() { transient_errors_ = 0; }
  static constexpr int kTransientRetries = 1000;
  static constexpr std::chrono::milliseconds kTransientPause{1};

 protected:
  File& file_;
  std::vector<Task> slots_;
  std::vector<Task*> free_;
  std::condition_variable wake_;  // work arrived / stop
  bool stopping_ = false;
  int transient_errors_ = 0;      // consecutive EAGAIN/EBUSY from the reaper's wait (reaper thread only)
};

// Backends.  Constructors throw SystemError when the kernel refuses (ENOSYS, EPERM, ...).
std::unique_ptr<Queue> make_uring_queue(File& file, int depth);
std::unique_ptr<Queue> make_linux_aio_queue(File& file, int depth);
std::unique_ptr<Queue> make_thread_queue(File& file, int depth);

// Probe helpers: set up and tear down the kernel object; "" when it works, else why not.
std::string uring_unavailable_reason();
std::string linux_aio_unavailable_reason();

std::string errno_text(int err);

}  // namespace hetmem::aio
