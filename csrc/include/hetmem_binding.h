// Shared by every op's binding file (the only files that include pybind11).
//
// HETMEM_SOURCE_HASH is set (as a bare token) by hetmem/ops/builder.py for JIT and
// ahead-of-time builds; the builder compares it with the sources on disk before it
// trusts a prebuilt module.
#pragma once

#ifndef HETMEM_SOURCE_HASH
#define HETMEM_SOURCE_HASH unknown
#endif

#define HETMEM_STRINGIFY_(x) #x
#define HETMEM_STRINGIFY(x) HETMEM_STRINGIFY_(x)

// Call first in every PYBIND11_MODULE body.
#define HETMEM_MODULE_INFO(m) (m).attr("source_hash") = HETMEM_STRINGIFY(HETMEM_SOURCE_HASH)
