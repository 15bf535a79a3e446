"""Byte sizes: parse "6GiB"-style strings once, at the boundary, and format them back."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, key: str = "size") -> int:
    """Bytes from an int or a string like "512MiB", "6GiB", "1.5GiB", "4096".

    Raises ValueError naming ``key`` and the value when it is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a size; give bytes as an int or a string like '6GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{key}={value!r} is negative; give a size in bytes >= 0")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            number, unit = match.groups()
            return int(float(number) * _UNITS[unit.lower()])
    raise ValueError(f"{key}={value!r} is not a size; give bytes as an int or a string with a unit "
                     f"such as '512MiB' or '6GiB' (binary units KiB/MiB/GiB/TiB, or KB/MB/GB)")


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; exact small values stay in bytes."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*$")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(value: int | str, *, key: str = "count") -> int:
    """A count like 250000000, "250M", "1.5B" (k, M, B/G: powers of 1000)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _COUNT.match(value)
        if match:
            return int(float(match.group(1)) * _COUNT_UNITS[match.group(2).lower()])
    raise ValueError(f"{key}={value!r} is not a count; give an integer or a string like '250M' or '1.5B'")
