// hetmem async file IO engine: the core (no torch, no pybind11).
//
// One `File` is one open file plus a set of IO queues (io_uring rings, Linux AIO contexts
// or blocking worker threads).  A caller submits whole requests (read or write `length`
// bytes at `offset` from/to caller memory) and gets an id back; the engine cuts each
// request into `block_size` pieces and keeps up to `queue_depth` of them in flight per
// queue, `threads` queues in all.
//
// Every completion is checked.  A block that fails (res < 0) or moves fewer bytes than
// asked fails its request with the errno, the block's offset and length, and the bytes
// moved; a request is reported done-successfully only when all of its bytes moved.
//
// Short completions: a kernel backend's completion that moved some bytes but not all is
// resubmitted for the rest when the rest is still aligned for O_DIRECT (or the file is
// buffered); one that moved nothing, or whose rest is unaligned, fails the request as a
// short transfer (errno EIO).  The thread backend's pread/pwrite loop continues after a
// partial transfer and retries EINTR, and stops at 0 bytes (end of file).
//
// O_DIRECT: the file is opened with O_DIRECT unless asked not to or refused (EINVAL, e.g.
// a file system without direct IO), in which case it is buffered and `direct()` says so.
// The memory and offset alignment come from statx(STATX_DIOALIGN) where the kernel has it,
// else the file system block size.  A request whose memory, offset or length is not
// aligned goes through staging buffers the engine owns (at most 1 MiB per in-flight
// piece); writes read-modify-write the partial aligned units at their edges, and two
// requests whose edges share an aligned unit are serialized on that unit.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace hetmem::aio {

enum class BackendKind : int { IoUring = 0, LinuxAio = 1, Threads = 2 };
const char* backend_name(BackendKind kind);
// false when `name` is not one of "io_uring", "linux_aio", "threads".
bool parse_backend(const std::string& name, BackendKind* kind);

enum class Op : int { Read = 0, Write = 1 };

struct Options {
  BackendKind backend = BackendKind::IoUring;
  uint64_t block_size = 1 << 20;  // bytes per IO; rounded up to the offset alignment
  int queue_depth = 8;            // IOs in flight per queue
  int threads = 1;                // queues (rings / AIO contexts / groups of worker threads)
  bool direct = true;             // try O_DIRECT
  bool read_only = false;         // O_RDONLY; else O_RDWR | O_CREAT
};

// A failure to open or set up (not a request failure): errno plus what was attempted.
class SystemError : public std::runtime_error {
 public:
  SystemError(int err, const std::string& what, std::string path = "")
      : std::runtime_error(what), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

// What a request came to.  `error` is 0 on success; otherwise the errno of the first
// failed block (EIO for a short transfer, with `short_transfer` set) and that block's
// file offset, length and the bytes of it that moved.
struct RequestStatus {
  bool done = false;
  int error = 0;
  bool short_transfer = false;
  uint64_t moved = 0;        // bytes of the request confirmed moved
  uint64_t fail_offset = 0;  // the failed block (file offset, length, bytes moved)
  uint64_t fail_length = 0;
  uint64_t fail_moved = 0;
};

// Test-only fault injection: after `after` further completions, the next one is altered.
enum class FaultKind : int {
  None = 0,
  Error = 1,    // the completion reports -err
  Short = 2,    // it reports `short_by` fewer bytes, final (the request fails short)
  Partial = 3,  // it reports `short_by` fewer bytes, the engine resubmits the rest
  ReapError = 4,  // every wait for completions (io_uring_enter / io_getevents) fails with
                  // -err until the fault is set to None: a persistent reaper error
  SubmitError = 5,  // the next `after` submissions (io_uring_enter / io_submit) fail with
                    // -err before reaching the kernel; after == 0: every one until None
};

class Queue;
struct Task;
struct Request;

class File {
 public:
  File(const std::string& path, const Options& options);  // throws SystemError
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Queue a read into / write from `buf` (caller memory that must stay valid until the
  // request is done).  Returns the request id.  Throws std::logic_error after close().
  uint64_t submit(Op op, void* buf, uint64_t length, uint64_t offset);
  // Status without blocking; the request stays known.  Throws std::out_of_range on an
  // unknown id.
  RequestStatus poll(uint64_t id);
  // Block until the request is done, forget it and return its status.
  RequestStatus wait(uint64_t id);
  // Wait for every request, stop the queues and close the file.  Idempotent.
  void close();

  void set_fault(FaultKind kind, uint64_t after, int err, uint64_t short_by);

  bool direct() const { return direct_; }
  // Why the file is buffered although O_DIRECT was asked for ("" when it is direct).
  const std::string& direct_note() const { return direct_note_; }
  uint32_t mem_align() const { return mem_align_; }
  uint32_t offset_align() const { return offset_align_; }
  BackendKind backend() const { return options_.backend; }
  uint64_t block_size() const { return options_.block_size; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

  // -- for the queues (called with mutex() held) ----------------------------------------
  std::mutex& mutex() { return mu_; }
  // A queue hands back finished IOs; result is bytes moved or -errno.
  void complete(Task* task, int64_t result);
  // Carve new IOs for `queue` from waiting requests and submit them.
  void fill(Queue* queue);
  // A queue's reaper met a persistent error: its IOs in flight fail with `err`, and so does
  // every IO later given to it; the reaper then exits (see queue.h, reap_failed()).
  void fail_queue(Queue* queue, int err);
  // The injected persistent reaper error (errno), 0 when none is armed.
  int reap_fault() const { return reap_fault_err_; }

 private:
  bool carve(Request* req, Task* task);
  bool lock_edges(Task* task);
  void unlock_edges(Task* task);
  void fail(Request* req, Task* task, int err, bool is_short);
  void finish_task(Task* task);
  void finalize(Request* req);
  void submit_to(Queue* queue, Task** tasks, int n);
  void issue(Queue* queue, std::vector<Task*>& work);
  void resume_deferred();
  bool idle() const;
  Request* next_pending();
  char* staging_of(Task* task);

  std::string path_;
  Options options_;
  int fd_ = -1;
  bool direct_ = false;
  std::string direct_note_;
  uint32_t mem_align_ = 1;     // alignment O_DIRECT needs of memory addresses
  uint32_t offset_align_ = 1;  // ... of file offsets and lengths
  uint64_t staging_size_ = 0;  // bytes per staged piece
  uint64_t logical_size_ = 0;  // the file's size as the requests define it (for edges)
  int padding_writers_ = 0;    // requests whose aligned tail may lie past logical_size_

  std::mutex mu_;                       // guards everything below and the queues' state
  std::condition_variable done_cv_;     // a request finished
  bool closed_ = false;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::unique_ptr<Request>> requests_;  // until waited
  // Requests with blocks not yet cut, FIFO per direction ([Op::Read], [Op::Write]).  When
  // both have work, IOs are cut from them alternately, so a load and a store in flight
  // together both progress (the swap pipeline reads i+1 while it writes i-1).
  std::deque<Request*> pending_[2];
  int next_direction_ = 0;
  std::vector<Task*> deferred_;         // staged writes waiting for an edge unit
  std::unordered_set<uint64_t> locked_units_;  // aligned units under read-modify-write
  std::vector<std::unique_ptr<Queue>> queues_;

  // Fault injection (tests); `fault_armed_` is the only cost when off.
  bool fault_armed_ = false;
  FaultKind fault_kind_ = FaultKind::None;
  uint64_t fault_countdown_ = 0;
  int fault_err_ = 0;
  uint64_t fault_short_by_ = 0;
  int reap_fault_err_ = 0;
  int submit_fault_err_ = 0;
  uint64_t submit_fault_left_ = 0;  // submissions still to fail (~0: until disarmed)
};

// Aligned memory for staging (and for callers who want it): free with aligned_free.
void* aligned_alloc_bytes(uint64_t alignment, uint64_t nbytes);
void aligned_free(void* p);

// Alignment O_DIRECT needs on an open file: statx(STATX_DIOALIGN) where the kernel
// reports it, else the file system's block size.  Returns false when statx says the file
// does not support direct IO at all.
bool query_dio_alignment(int fd, uint32_t* mem_align, uint32_t* offset_align);

// Why `kind` cannot run on this kernel, or "" when it can (sets up and tears down a
// queue of depth 1).
std::string backend_unavailable_reason(BackendKind kind);

}  // namespace hetmem::aio
