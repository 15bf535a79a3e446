// Thread backend: `queue_depth` threads per queue, each doing blocking pread/pwrite.
// Works on any kernel and any file system; the fallback when neither kernel interface is
// allowed (e.g. io_uring disabled by a seccomp profile and AIO contexts exhausted).
#include <unistd.h>

#include <cerrno>
#include <deque>

#include "queue.h"

namespace hetmem::aio {

namespace {

// pread/pwrite until all bytes moved, 0 bytes (end of file / nothing more) or an error.
// EINTR is retried; a partial transfer continues where it stopped.
int64_t blocking_io(int fd, Op op, char* buf, uint64_t length, uint64_t offset) {
  uint64_t moved = 0;
  while (moved < length) {
    ssize_t r = op == Op::Read ? ::pread(fd, buf + moved, length - moved, off_t(offset + moved))
                               : ::pwrite(fd, buf + moved, length - moved, off_t(offset + moved));
    if (r < 0) {
      if (errno == EINTR) continue;
      return moved > 0 ? int64_t(moved) : -int64_t(errno);  // report the progress; the rest fails next
    }
    if (r == 0) break;
    moved += uint64_t(r);
  }
  return int64_t(moved);
}

class ThreadQueue final : public Queue {
 public:
  ThreadQueue(File& file, int depth) : Queue(file, depth) {}

  ~ThreadQueue() override { stop(); }

  int submit(Task** tasks, int n, int*) override {
    for (int i = 0; i < n; ++i) work_.push_back(tasks[i]);
    if (n == 1) wake_.notify_one();
    else wake_.notify_all();
    return n;
  }

  void start() override {
    for (size_t i = 0; i < slots_.size(); ++i) threads_.emplace_back([this] { run(); });
  }

  void stop() override {
    {
      std::lock_guard<std::mutex> lock(file_.mutex());
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(file_.mutex());
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || !work_.empty(); });
      if (work_.empty()) return;  // stopping, nothing left
      Task* t = work_.front();
      work_.pop_front();
      Op op = t->op;
      char* buf = t->buf + t->done;
      uint64_t length = t->length - t->done;
      uint64_t offset = t->offset + t->done;
      int fd = file_.fd();
      lock.unlock();
      int64_t result = blocking_io(fd, op, buf, length, offset);
      lock.lock();
      file_.complete(t, result);
      file_.fill(this);
    }
  }

  std::deque<Task*> work_;
  std::vector<std::thread> threads_;
};

}  // namespace

std::unique_ptr<Queue> make_thread_queue(File& file, int depth) { return std::make_unique<ThreadQueue>(file, depth); }

}  // namespace hetmem::aio
