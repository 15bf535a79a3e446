// Linux native AIO backend (io_setup / io_submit / io_getevents: what libaio wraps),
// through the raw syscalls and <linux/aio_abi.h>: no libaio.
//
// One AIO context per queue, one iocb per slot, one reaper thread per context.  Linux AIO
// is asynchronous only with O_DIRECT; on a buffered file io_submit does the copy itself.
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "queue.h"

namespace hetmem::aio {

namespace {

int aio_setup(unsigned nr, aio_context_t* ctx) { return int(syscall(__NR_io_setup, nr, ctx)); }
int aio_destroy(aio_context_t ctx) { return int(syscall(__NR_io_destroy, ctx)); }
long aio_submit(aio_context_t ctx, long n, iocb** list) { return syscall(__NR_io_submit, ctx, n, list); }

long aio_getevents(aio_context_t ctx, long min_nr, long nr, io_event* events) {
#ifdef __NR_io_getevents
  return syscall(__NR_io_getevents, ctx, min_nr, nr, events, nullptr);
#else  // architectures that only have io_pgetevents
  return syscall(__NR_io_pgetevents, ctx, min_nr, nr, events, nullptr, nullptr);
#endif
}

class LinuxAioQueue final : public Queue {
 public:
  LinuxAioQueue(File& file, int depth) : Queue(file, depth), iocbs_(size_t(depth)), list_(size_t(depth)) {
    if (aio_setup(unsigned(depth), &ctx_) < 0) throw SystemError(errno, "io_setup failed: " + errno_text(errno));
    for (size_t i = 0; i < slots_.size(); ++i) slots_[i].backend_data = &iocbs_[i];
  }

  ~LinuxAioQueue() override {
    stop();
    if (ctx_ != 0) aio_destroy(ctx_);
  }

  int submit(Task** tasks, int n, int* err) override {
    for (int i = 0; i < n; ++i) {
      Task* t = tasks[i];
      iocb* cb = static_cast<iocb*>(t->backend_data);
      std::memset(cb, 0, sizeof *cb);
      cb->aio_data = reinterpret_cast<uint64_t>(t);
      cb->aio_lio_opcode = t->op == Op::Read ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
      cb->aio_fildes = uint32_t(file_.fd());
      cb->aio_buf = reinterpret_cast<uint64_t>(t->buf + t->done);
      cb->aio_nbytes = t->length - t->done;
      cb->aio_offset = int64_t(t->offset + t->done);
      list_[size_t(i)] = cb;
    }
    int submitted = 0;
    while (submitted < n) {
      long r = aio_submit(ctx_, n - submitted, list_.data() + submitted);
      if (r > 0) {
        submitted += int(r);
        continue;
      }
      if (r < 0 && errno == EINTR) continue;
      *err = r < 0 ? errno : EIO;  // the iocb at `submitted` was refused (EAGAIN: retried by File::submit_to)
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
  void reap() {
    std::vector<io_event> events(slots_.size());
    for (;;) {
      int injected;
      {
        std::unique_lock<std::mutex> lock(file_.mutex());
        wake_.wait(lock, [&] { return stopping_ || inflight > 0; });
        if (inflight == 0) return;
        injected = file_.reap_fault();
      }
      long n = injected ? -1 : aio_getevents(ctx_, 1, long(events.size()), events.data());
      if (n < 0 && reap_failed(injected ? injected : errno)) return;
      if (n <= 0) continue;  // EINTR, or a transient error retried
      reaped();
      std::lock_guard<std::mutex> lock(file_.mutex());
      for (long i = 0; i < n; ++i) file_.complete(reinterpret_cast<Task*>(events[size_t(i)].data), events[size_t(i)].res);
      file_.fill(this);
    }
  }

  aio_context_t ctx_ = 0;
  std::vector<iocb> iocbs_;
  std::vector<iocb*> list_;
  std::thread reaper_;
};

}  // namespace

std::unique_ptr<Queue> make_linux_aio_queue(File& file, int depth) {
  return std::make_unique<LinuxAioQueue>(file, depth);
}

std::string linux_aio_unavailable_reason() {
  aio_context_t ctx = 0;
  if (aio_setup(1, &ctx) < 0) return "io_setup failed: " + errno_text(errno);
  aio_destroy(ctx);
  return "";
}

}  // namespace hetmem::aio
