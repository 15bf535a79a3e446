"""Byte sizes and counts for the public API and the CLI; they live in hetmem/_core/units.py so
that the layers below the API (chunk_manager/, nvme/, tracer/) can use them too."""
from hetmem._core.units import format_bytes, parse_count, parse_size

__all__ = ["format_bytes", "parse_count", "parse_size"]
