// Small pieces of the engine that talk to the platform: names, errno text, aligned
// memory, the O_DIRECT alignment query and the backend availability probe.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "engine.h"
#include "queue.h"

namespace hetmem::aio {

namespace {

// statx as the kernel lays it out (uapi linux/stat.h); our own copy so that older
// headers without stx_dio_* still build.  Only the fields we read are named.
struct KernelStatx {
  uint32_t mask;
  uint32_t blksize;
  uint64_t attributes;
  uint32_t nlink, uid, gid;
  uint16_t mode, spare0;
  uint64_t ino, size, blocks, attributes_mask;
  uint8_t timestamps[64];
  uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
  uint64_t mnt_id;
  uint32_t dio_mem_align;
  uint32_t dio_offset_align;
  uint64_t spare3[12];
};
static_assert(offsetof(KernelStatx, dio_mem_align) == 152, "statx layout");
static_assert(sizeof(KernelStatx) == 256, "statx layout");
constexpr uint32_t kStatxDioAlign = 0x2000;  // STATX_DIOALIGN

const char* pick_strerror(int rc, const char* buf) { return rc == 0 ? buf : "unknown error"; }
const char* pick_strerror(const char* msg, const char*) { return msg; }

}  // namespace

std::string errno_text(int err) {
  char buf[128] = {0};
  return pick_strerror(strerror_r(err, buf, sizeof buf), buf);
}

const char* backend_name(BackendKind kind) {
  switch (kind) {
    case BackendKind::IoUring: return "io_uring";
    case BackendKind::LinuxAio: return "linux_aio";
    case BackendKind::Threads: return "threads";
  }
  return "?";
}

bool parse_backend(const std::string& name, BackendKind* kind) {
  for (BackendKind k : {BackendKind::IoUring, BackendKind::LinuxAio, BackendKind::Threads}) {
    if (name == backend_name(k)) {
      *kind = k;
      return true;
    }
  }
  return false;
}

void* aligned_alloc_bytes(uint64_t alignment, uint64_t nbytes) {
  void* p = nullptr;
  if (posix_memalign(&p, alignment, nbytes) != 0) return nullptr;
  return p;
}

void aligned_free(void* p) { std::free(p); }

bool query_dio_alignment(int fd, uint32_t* mem_align, uint32_t* offset_align) {
#ifdef SYS_statx
  KernelStatx st{};
  if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, kStatxDioAlign, &st) == 0 && (st.mask & kStatxDioAlign)) {
    if (st.dio_mem_align == 0 || st.dio_offset_align == 0) return false;  // no direct IO here
    *mem_align = st.dio_mem_align;
    *offset_align = st.dio_offset_align;
    return true;
  }
#endif
  struct stat sb;
  uint32_t block = (fstat(fd, &sb) == 0 && sb.st_blksize > 0) ? uint32_t(sb.st_blksize) : 4096;
  *mem_align = block;
  *offset_align = block;
  return true;
}

std::string backend_unavailable_reason(BackendKind kind) {
  switch (kind) {
    case BackendKind::IoUring: return uring_unavailable_reason();
    case BackendKind::LinuxAio: return linux_aio_unavailable_reason();
    case BackendKind::Threads: return "";
  }
  return "unknown backend";
}

}  // namespace hetmem::aio
