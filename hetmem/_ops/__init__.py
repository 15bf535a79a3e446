"""Ops built ahead of time (HETMEM_BUILD_OPS=1) land here; see hetmem/ops/builder.py."""
