// CRC-32C: a hardware crc32 instruction on three independent streams where the CPU has it,
// else a portable slicing-by-8 table.
//
// - x86-64: the SSE4.2 crc32 instruction, chosen at run time (__builtin_cpu_supports);
// - aarch64 built with the CRC extension (__ARM_FEATURE_CRC32, e.g. -march=armv8-a+crc, which
//   every Grace/Neoverse core has): the ARMv8 crc32c instructions;
// - anywhere else, or with HETMEM_CRC32C_PORTABLE defined (tests build that to check the table
//   path gives the same results): the table.
//
// The three streams are joined with GF(2) arithmetic: with the CRC register r and no
// pre/post inversion, crc(r, A || B) = crc(0, B) ^ r * x^(8|B|) mod P, so three lanes of
// L bytes computed independently combine as r0 * x^(16L) ^ r1 * x^(8L) ^ r2.
#include "crc32c.h"

#include <cstring>

#if !defined(HETMEM_CRC32C_PORTABLE) && defined(__x86_64__)
#include <nmmintrin.h>
#define HETMEM_CRC32C_X86 1
#define HETMEM_CRC32C_TARGET __attribute__((target("sse4.2")))
#elif !defined(HETMEM_CRC32C_PORTABLE) && defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define HETMEM_CRC32C_ARM 1
#define HETMEM_CRC32C_TARGET
#endif

namespace hetmem::aio {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, bit-reflected
constexpr uint64_t kLane = 8192;         // bytes per stream per round

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

// The register after feeding `n` bytes (no inversion).
uint32_t table_update(uint32_t r, const unsigned char* p, uint64_t n) {
  const Tables& tb = tables();
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    uint64_t x = word ^ r;
    r = tb.t[7][x & 0xFF] ^ tb.t[6][(x >> 8) & 0xFF] ^ tb.t[5][(x >> 16) & 0xFF] ^ tb.t[4][(x >> 24) & 0xFF] ^
        tb.t[3][(x >> 32) & 0xFF] ^ tb.t[2][(x >> 40) & 0xFF] ^ tb.t[1][(x >> 48) & 0xFF] ^ tb.t[0][x >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) r = (r >> 8) ^ tb.t[0][(r ^ *p++) & 0xFF];
  return r;
}

#if defined(HETMEM_CRC32C_X86) || defined(HETMEM_CRC32C_ARM)

// a * b mod P in the reflected representation (bit 31 holds x^0).
uint32_t gf2_multiply(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & (0x80000000u >> i)) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

// x^(8n) mod P.
uint32_t x_pow_8n(uint64_t n) {
  uint32_t result = 0x80000000u;      // x^0
  uint32_t power = 0x80000000u >> 8;  // x^8
  while (n) {
    if (n & 1) result = gf2_multiply(result, power);
    power = gf2_multiply(power, power);
    n >>= 1;
  }
  return result;
}

#if defined(HETMEM_CRC32C_X86)
HETMEM_CRC32C_TARGET inline uint64_t hw_step_8(uint64_t r, uint64_t word) { return _mm_crc32_u64(r, word); }
HETMEM_CRC32C_TARGET inline uint32_t hw_step_1(uint32_t r, unsigned char byte) { return _mm_crc32_u8(r, byte); }
constexpr const char* kHardwareName = "sse4.2 (3 streams)";
bool have_hardware() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#else
inline uint64_t hw_step_8(uint64_t r, uint64_t word) { return __crc32cd(uint32_t(r), word); }
inline uint32_t hw_step_1(uint32_t r, unsigned char byte) { return __crc32cb(r, byte); }
constexpr const char* kHardwareName = "armv8 crc32c (3 streams)";
bool have_hardware() { return true; }  // compiled for a CPU with the CRC extension
#endif

HETMEM_CRC32C_TARGET uint32_t hw_update_1(uint32_t r, const unsigned char* p, uint64_t n) {
  uint64_t r64 = r;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    r64 = hw_step_8(r64, word);
    p += 8;
    n -= 8;
  }
  r = uint32_t(r64);
  while (n--) r = hw_step_1(r, *p++);
  return r;
}

HETMEM_CRC32C_TARGET uint32_t hw_update(uint32_t r, const unsigned char* p, uint64_t n) {
  static const uint32_t shift_1 = x_pow_8n(kLane);
  static const uint32_t shift_2 = x_pow_8n(2 * kLane);
  while (n >= 3 * kLane) {
    uint64_t r0 = r, r1 = 0, r2 = 0;
    const unsigned char* a = p;
    const unsigned char* b = p + kLane;
    const unsigned char* c = p + 2 * kLane;
    for (uint64_t i = 0; i < kLane; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, a + i, 8);
      std::memcpy(&wb, b + i, 8);
      std::memcpy(&wc, c + i, 8);
      r0 = hw_step_8(r0, wa);
      r1 = hw_step_8(r1, wb);
      r2 = hw_step_8(r2, wc);
    }
    r = gf2_multiply(uint32_t(r0), shift_2) ^ gf2_multiply(uint32_t(r1), shift_1) ^ uint32_t(r2);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return hw_update_1(r, p, n);
}

#else  // portable: the table only

constexpr const char* kHardwareName = "none";
bool have_hardware() { return false; }
uint32_t hw_update(uint32_t r, const unsigned char* p, uint64_t n) { return table_update(r, p, n); }

#endif

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, uint64_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint32_t r = ~crc;
  r = have_hardware() ? hw_update(r, p, n) : table_update(r, p, n);
  return ~r;
}

uint32_t crc32c_extend_table(uint32_t crc, const void* data, uint64_t n) {
  return ~table_update(~crc, static_cast<const unsigned char*>(data), n);
}

const char* crc32c_implementation() { return have_hardware() ? kHardwareName : "table (slicing-by-8)"; }

}  // namespace hetmem::aio
