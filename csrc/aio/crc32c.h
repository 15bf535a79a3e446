// CRC-32C (Castagnoli), as iSCSI/ext4/Btrfs use it: crc32c("123456789") == 0xE3069283.
#pragma once

#include <cstdint>

namespace hetmem::aio {

// The CRC-32C of `crc`'s data followed by these `n` bytes (start with crc = 0).
uint32_t crc32c_extend(uint32_t crc, const void* data, uint64_t n);

// The same with the table path whatever the CPU has (to test one against the other).
uint32_t crc32c_extend_table(uint32_t crc, const void* data, uint64_t n);

// "sse4.2 (3 streams)", "armv8 crc32c (3 streams)" or "table (slicing-by-8)": the path
// crc32c_extend takes here.
const char* crc32c_implementation();

}  // namespace hetmem::aio
