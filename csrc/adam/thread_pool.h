// A small persistent thread pool for the CPU Adam kernel (no OpenMP dependency).
//
// Workers sleep on a condition variable between calls, so an idle pool takes no CPU time
// from the IO engine's threads.  The calling thread does share 0 of every job itself.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace hetmem {
namespace adam {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // threads >= 1, counting the caller
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }

  // Runs task(k) for k in [0, shares), shares <= size(): share 0 on the calling thread,
  // share k on worker k.  Returns when every share is done.  One job at a time: the
  // caller must serialize calls (kernels.cpp holds a mutex around each).
  void run(int shares, const std::function<void(int)>& task);

 private:
  void worker_loop(int index);

  const int size_;                         // threads counting the caller; fixed for life
  std::vector<std::thread> workers_;       // size_ - 1 threads, joined by the destructor
  std::mutex mutex_;                       // guards every field below
  std::condition_variable wake_;           // workers wait here for a new generation
  std::condition_variable done_;           // the caller waits here for pending_ == 0
  const std::function<void(int)>* task_ = nullptr;  // the current job; valid while pending_ > 0
  int shares_ = 0;                         // shares of the current job
  uint64_t generation_ = 0;                // bumped once per job
  int pending_ = 0;                        // worker shares of the current job not yet done
  bool stopping_ = false;                  // set by the destructor
};

}  // namespace adam
}  // namespace hetmem
