// The engine: cuts requests into IOs, stages unaligned ones, checks every completion.
// See engine.h for the model and the promises.
#include "engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "queue.h"

namespace hetmem::aio {

namespace {

constexpr uint64_t kMaxStagingPiece = 1 << 20;  // staging buffer per in-flight piece
constexpr int kSubmitBatch = 64;

uint64_t align_down(uint64_t x, uint64_t a) { return x - x % a; }
uint64_t align_up(uint64_t x, uint64_t a) { return align_down(x + a - 1, a); }

}  // namespace

// -- open / close ------------------------------------------------------------------------

File::File(const std::string& path, const Options& options) : path_(path), options_(options) {
  if (options_.block_size == 0 || options_.block_size > (uint64_t(1) << 30))
    throw std::invalid_argument("block_size must be in [1, 1 GiB], got " + std::to_string(options_.block_size));
  if (options_.queue_depth < 1 || options_.queue_depth > 4096)
    throw std::invalid_argument("queue_depth must be in [1, 4096], got " + std::to_string(options_.queue_depth));
  if (options_.threads < 1 || options_.threads > 256)
    throw std::invalid_argument("threads must be in [1, 256], got " + std::to_string(options_.threads));

  int flags = (options_.read_only ? O_RDONLY : (O_RDWR | O_CREAT)) | O_CLOEXEC;
  if (options_.direct) {
    fd_ = ::open(path_.c_str(), flags | O_DIRECT, 0644);
    if (fd_ < 0 && errno != EINVAL) throw SystemError(errno, "open(O_DIRECT) failed: " + errno_text(errno), path_);
    if (fd_ < 0) {
      direct_note_ = "open(O_DIRECT) refused: " + errno_text(EINVAL);
    } else if (!query_dio_alignment(fd_, &mem_align_, &offset_align_)) {
      direct_note_ = "statx reports no direct IO support for this file";
      ::close(fd_);
      fd_ = -1;
    } else {
      direct_ = true;
    }
  }
  if (fd_ < 0) {
    fd_ = ::open(path_.c_str(), flags, 0644);
    if (fd_ < 0) throw SystemError(errno, "open failed: " + errno_text(errno), path_);
    mem_align_ = offset_align_ = 1;
  }
  options_.block_size = align_up(options_.block_size, offset_align_);
  staging_size_ = std::max<uint64_t>(offset_align_, align_down(std::min(options_.block_size, kMaxStagingPiece), offset_align_));
  struct stat sb;
  if (fstat(fd_, &sb) == 0) logical_size_ = uint64_t(sb.st_size);

  try {
    for (int i = 0; i < options_.threads; ++i) {
      switch (options_.backend) {
        case BackendKind::IoUring: queues_.push_back(make_uring_queue(*this, options_.queue_depth)); break;
        case BackendKind::LinuxAio: queues_.push_back(make_linux_aio_queue(*this, options_.queue_depth)); break;
        case BackendKind::Threads: queues_.push_back(make_thread_queue(*this, options_.queue_depth)); break;
      }
      queues_.back()->start();
    }
  } catch (...) {
    for (auto& q : queues_) q->stop();
    queues_.clear();
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

File::~File() {
  try {
    close();
  } catch (...) {
  }
}

bool File::idle() const {
  if (!pending_[0].empty() || !pending_[1].empty() || !deferred_.empty()) return false;
  for (const auto& q : queues_)
    if (q->inflight != 0) return false;
  return true;
}

void File::close() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;  // no new requests; those in flight finish
    done_cv_.wait(lock, [&] { return idle(); });
  }
  for (auto& q : queues_) q->stop();
  for (auto& q : queues_)
    for (auto& t : q->slots()) aligned_free(t.staging);
  queues_.clear();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

// -- requests ----------------------------------------------------------------------------

uint64_t File::submit(Op op, void* buf, uint64_t length, uint64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw std::logic_error("submit on a closed file: " + path_);
  if (op == Op::Write && options_.read_only) throw std::logic_error("write to a file opened read-only: " + path_);
  auto owned = std::make_unique<Request>();
  Request* req = owned.get();
  req->id = next_id_++;
  req->op = op;
  req->user = static_cast<char*>(buf);
  req->offset = offset;
  req->length = length;
  requests_.emplace(req->id, std::move(owned));
  if (length == 0) {
    req->status.done = true;
    return req->id;
  }
  bool aligned = !direct_ || (reinterpret_cast<uintptr_t>(buf) % mem_align_ == 0 && offset % offset_align_ == 0 &&
                              length % offset_align_ == 0);
  req->staged = !aligned;
  req->cursor = aligned ? offset : align_down(offset, offset_align_);
  req->end = aligned ? offset + length : align_up(offset + length, offset_align_);
  if (op == Op::Write) logical_size_ = std::max(logical_size_, offset + length);
  if (op == Op::Write && req->staged && padding_writers_ == 0) {
    // Others may have grown the file (a preallocation through another descriptor): the
    // size to cut padding back to is never below it.  Only read while no padding of ours
    // is in the file.
    struct stat sb;
    if (fstat(fd_, &sb) == 0) logical_size_ = std::max(logical_size_, uint64_t(sb.st_size));
  }
  pending_[int(op)].push_back(req);
  for (auto& q : queues_) fill(q.get());
  return req->id;
}

RequestStatus File::poll(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  return it->second->status;
}

RequestStatus File::wait(uint64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  Request* req = it->second.get();
  done_cv_.wait(lock, [&] { return req->status.done; });
  RequestStatus status = req->status;
  requests_.erase(it);
  return status;
}

void File::set_fault(FaultKind kind, uint64_t after, int err, uint64_t short_by) {
  std::lock_guard<std::mutex> lock(mu_);
  if (kind == FaultKind::ReapError || kind == FaultKind::None) reap_fault_err_ = kind == FaultKind::None ? 0 : err;
  if (kind == FaultKind::SubmitError || kind == FaultKind::None) {
    submit_fault_err_ = err;
    submit_fault_left_ = kind == FaultKind::None ? 0 : after == 0 ? ~uint64_t(0) : after;
    if (kind == FaultKind::SubmitError) return;
  }
  if (kind == FaultKind::ReapError) {
    for (auto& q : queues_) q->wake();  // a reaper asleep with nothing in flight sees it at its next wait
    return;
  }
  fault_kind_ = kind;
  fault_countdown_ = after;
  fault_err_ = err;
  fault_short_by_ = short_by;
  fault_armed_ = kind != FaultKind::None;
}

// -- cutting requests into IOs -----------------------------------------------------------

char* File::staging_of(Task* task) {
  if (task->staging == nullptr)
    task->staging = static_cast<char*>(aligned_alloc_bytes(std::max<uint64_t>(mem_align_, 4096), staging_size_));
  return task->staging;
}

bool File::carve(Request* req, Task* task) {
  task->req = req;
  task->done = 0;
  task->final_result = false;
  task->lock_head = task->lock_tail = Task::kNoUnit;
  task->locks_held = false;
  req->inflight++;
  if (!req->staged) {
    uint64_t n = std::min(options_.block_size, req->end - req->cursor);
    task->stage = Task::Stage::Direct;
    task->op = req->op;
    task->buf = req->user + (req->cursor - req->offset);
    task->offset = req->cursor;
    task->length = n;
    req->cursor += n;
    return true;
  }
  uint64_t p0 = req->cursor;
  uint64_t p1 = std::min(p0 + staging_size_, req->end);
  req->cursor = p1;
  task->buf = staging_of(task);
  task->offset = p0;
  task->length = p1 - p0;
  task->user_begin = std::max(p0, req->offset);
  task->user_end = std::min(p1, req->offset + req->length);
  if (task->buf == nullptr) {  // out of memory for the staging buffer: fail, do not issue
    task->stage = Task::Stage::StagedRead;
    return true;  // submit_to() sees buf == nullptr
  }
  if (req->op == Op::Read) {
    task->stage = Task::Stage::StagedRead;
    task->op = Op::Read;
    return true;
  }
  bool head_partial = task->user_begin > p0;
  bool tail_partial = task->user_end < p1;
  if (!head_partial && !tail_partial) {
    std::memcpy(task->buf + (task->user_begin - p0), req->user + (task->user_begin - req->offset),
                task->user_end - task->user_begin);
    task->stage = Task::Stage::StagedWrite;
    task->op = Op::Write;
    return true;
  }
  // Read-modify-write: read the piece, patch the caller's bytes in, write it back.
  task->stage = Task::Stage::RmwRead;
  task->op = Op::Read;
  if (head_partial) task->lock_head = p0 / offset_align_;
  if (tail_partial) task->lock_tail = (p1 - 1) / offset_align_;
  return lock_edges(task);
}

bool File::lock_edges(Task* task) {
  auto busy = [&](uint64_t unit) { return unit != Task::kNoUnit && locked_units_.count(unit) != 0; };
  if (busy(task->lock_head) || busy(task->lock_tail)) return false;
  if (task->lock_head != Task::kNoUnit) locked_units_.insert(task->lock_head);
  if (task->lock_tail != Task::kNoUnit) locked_units_.insert(task->lock_tail);
  task->locks_held = true;
  return true;
}

void File::unlock_edges(Task* task) {
  if (!task->locks_held) return;
  if (task->lock_head != Task::kNoUnit) locked_units_.erase(task->lock_head);
  if (task->lock_tail != Task::kNoUnit) locked_units_.erase(task->lock_tail);
  task->locks_held = false;
}

Request* File::next_pending() {
  bool reads = !pending_[0].empty(), writes = !pending_[1].empty();
  if (reads && writes) {
    next_direction_ ^= 1;
    return pending_[next_direction_].front();
  }
  return reads ? pending_[0].front() : writes ? pending_[1].front() : nullptr;
}

void File::fill(Queue* queue) {
  Task* batch[kSubmitBatch];
  int n = 0;
  auto& free = queue->free_slots();
  Request* req;
  while (!free.empty() && (req = next_pending()) != nullptr) {
    Task* task = free.back();
    free.pop_back();
    bool ready = carve(req, task);
    if (req->cursor >= req->end) pending_[int(req->op)].pop_front();
    if (!ready) {
      deferred_.push_back(task);
      continue;
    }
    batch[n++] = task;
    if (n == kSubmitBatch) {
      submit_to(queue, batch, n);
      n = 0;
    }
  }
  if (n > 0) submit_to(queue, batch, n);
}

void File::submit_to(Queue* queue, Task** tasks, int n) {
  // A staged task without a staging buffer (allocation failed) fails here, not in the kernel.
  int kept = 0;
  std::vector<Task*> no_memory;
  for (int i = 0; i < n; ++i) {
    if (tasks[i]->buf == nullptr) no_memory.push_back(tasks[i]);
    else tasks[kept++] = tasks[i];
  }
  queue->inflight += n;
  for (int i = 0; i < kept; ++i) tasks[i]->unissued = true;
  if (queue->submitting) {  // another thread is backing off on this queue: it issues these too
    queue->backlog.insert(queue->backlog.end(), tasks, tasks + kept);
  } else if (kept > 0) {
    queue->submitting = true;
    std::vector<Task*> work(tasks, tasks + kept);
    while (!work.empty()) {
      issue(queue, work);
      work.swap(queue->backlog);
      queue->backlog.clear();
    }
    queue->submitting = false;
  }
  for (Task* t : no_memory) complete(t, -int64_t(ENOMEM));
}

// Issue `work` to `queue` (called with mu_ held; returns with it held).  EINTR is retried by
// the queue; EAGAIN/EBUSY after a pause without mu_ (so completions and the reaper go on), at
// most Queue::kTransientRetries times in a row; then, or on any other error, the tasks not
// accepted complete with -errno and their requests fail naming it.
void File::issue(Queue* queue, std::vector<Task*>& work) {
  size_t done = 0;
  int transient = 0;
  int err = queue->broken;
  while (err == 0 && done < work.size()) {
    int e = 0;
    int accepted;
    if (__builtin_expect(submit_fault_left_ > 0, false)) {
      accepted = 0;
      e = submit_fault_err_;
      if (submit_fault_left_ != ~uint64_t(0)) submit_fault_left_--;
    } else {
      accepted = queue->submit(work.data() + done, int(work.size() - done), &e);
    }
    for (int i = 0; i < accepted; ++i) work[done + size_t(i)]->unissued = false;
    done += size_t(accepted);
    if (accepted > 0) transient = 0;
    if (e == 0) continue;
    if ((e == EAGAIN || e == EBUSY) && ++transient <= Queue::kTransientRetries) {
      mu_.unlock();
      std::this_thread::sleep_for(Queue::kTransientPause);
      mu_.lock();
      err = queue->broken;
      continue;
    }
    err = e;
  }
  for (size_t i = done; i < work.size(); ++i) {
    work[i]->unissued = false;
    complete(work[i], -int64_t(err ? err : EIO));
  }
}

void File::fail_queue(Queue* queue, int err) {
  queue->broken = err;
  std::vector<Task*> lost;  // issued to the kernel, never to be reaped: every busy slot not deferred
  for (auto& t : queue->slots())
    if (t.req != nullptr && !t.unissued && std::find(deferred_.begin(), deferred_.end(), &t) == deferred_.end())
      lost.push_back(&t);  // (an unissued one is failed by its submitter, which sees `broken`)
  for (Task* t : lost) complete(t, -int64_t(err));
  fill(queue);  // requests still waiting to be cut fail here too (at once) unless another queue takes them
  done_cv_.notify_all();
}

// -- completions -------------------------------------------------------------------------

void File::complete(Task* task, int64_t result) {
  task->queue->inflight--;
  if (__builtin_expect(fault_armed_, false)) {
    if (fault_countdown_ > 0) {
      fault_countdown_--;
    } else {
      fault_armed_ = false;
      if (fault_kind_ == FaultKind::Error) {
        result = -int64_t(fault_err_);
      } else if (result > 0) {
        result = std::max<int64_t>(0, result - int64_t(fault_short_by_));
        task->final_result = fault_kind_ == FaultKind::Short;
      }
    }
  }
  Request* req = task->req;
  if (req->failed) {  // another IO of this request failed; this one no longer matters
    finish_task(task);
    return;
  }
  if (result < 0) {
    fail(req, task, int(-result), false);
    finish_task(task);
    return;
  }
  task->done += uint64_t(result);
  uint64_t want = task->stage == Task::Stage::StagedRead ? task->user_end - task->offset : task->length;
  if (task->done < want) {
    bool rest_aligned = !direct_ || (task->done % offset_align_ == 0 &&
                                     reinterpret_cast<uintptr_t>(task->buf + task->done) % mem_align_ == 0);
    if (result > 0 && rest_aligned && !task->final_result) {  // partial: resubmit the rest
      submit_to(task->queue, &task, 1);
      return;
    }
    // A read-modify-write piece may run past the end of the file: the kernel stops a
    // regular file's read only there, and the bytes past it are zeros.  (The file may be
    // longer by now: others may have written past our units, never into them - we hold
    // their locks - and our request covers the rest of the piece.)
    bool past_eof = task->stage == Task::Stage::RmwRead && !task->final_result;
    if (!past_eof) {
      fail(req, task, EIO, true);
      finish_task(task);
      return;
    }
    std::memset(task->buf + task->done, 0, task->length - task->done);
    task->done = task->length;
    if (!req->extends_file) {
      req->extends_file = true;
      padding_writers_++;
    }
  }
  uint64_t user_bytes = task->user_end - task->user_begin;
  switch (task->stage) {
    case Task::Stage::Direct:
      req->status.moved += task->length;
      break;
    case Task::Stage::StagedRead:
      std::memcpy(req->user + (task->user_begin - req->offset), task->buf + (task->user_begin - task->offset),
                  user_bytes);
      req->status.moved += user_bytes;
      break;
    case Task::Stage::RmwRead:
      std::memcpy(task->buf + (task->user_begin - task->offset), req->user + (task->user_begin - req->offset),
                  user_bytes);
      task->stage = Task::Stage::StagedWrite;
      task->op = Op::Write;
      task->done = 0;
      submit_to(task->queue, &task, 1);
      return;
    case Task::Stage::StagedWrite:
      req->status.moved += user_bytes;
      break;
  }
  finish_task(task);
}

void File::fail(Request* req, Task* task, int err, bool is_short) {
  if (!req->failed) {
    req->failed = true;
    req->status.error = err;
    req->status.short_transfer = is_short;
    req->status.fail_offset = task->offset;
    req->status.fail_length = task->length;
    req->status.fail_moved = task->done;
  }
  if (req->cursor < req->end) {  // cut nothing more from it
    auto& fifo = pending_[int(req->op)];
    fifo.erase(std::remove(fifo.begin(), fifo.end(), req), fifo.end());
    req->end = req->cursor;
  }
  std::vector<Task*> dropped;
  for (Task* t : deferred_)
    if (t->req == req) dropped.push_back(t);
  if (dropped.empty()) return;
  deferred_.erase(std::remove_if(deferred_.begin(), deferred_.end(), [&](Task* t) { return t->req == req; }),
                  deferred_.end());
  for (Task* t : dropped) finish_task(t);  // never submitted: no queue bookkeeping
}

void File::finish_task(Task* task) {
  Request* req = task->req;
  bool released_locks = task->locks_held;
  unlock_edges(task);
  task->req = nullptr;
  task->queue->free_slots().push_back(task);
  req->inflight--;
  if (req->inflight == 0 && (req->failed || req->cursor >= req->end)) finalize(req);
  if (released_locks) resume_deferred();
}

void File::resume_deferred() {
  std::vector<Task*> ready;
  for (size_t i = 0; i < deferred_.size();) {
    if (lock_edges(deferred_[i])) {
      ready.push_back(deferred_[i]);
      deferred_.erase(deferred_.begin() + long(i));
    } else {
      ++i;
    }
  }
  for (Task* t : ready) t->unissued = true;  // a submit_to below may back off without mu_
  for (Task* t : ready) submit_to(t->queue, &t, 1);
}

void File::finalize(Request* req) {
  if (req->extends_file) {
    // The aligned write of a unit past the end of the file grew it beyond what was asked;
    // cut it back to the size the requests define (never below any submitted write).
    padding_writers_--;
    struct stat sb;
    if (fstat(fd_, &sb) == 0 && uint64_t(sb.st_size) > logical_size_ && ftruncate(fd_, off_t(logical_size_)) != 0) {
      req->failed = true;
      req->status.error = errno;
      req->status.fail_offset = logical_size_;
      req->status.fail_length = uint64_t(sb.st_size) - logical_size_;
    }
  }
  req->status.done = true;
  done_cv_.notify_all();
}

}  // namespace hetmem::aio
