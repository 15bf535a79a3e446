"""A longer run of the engine fuzzer: random call sequences against a plain-PyTorch twin.

The same property as tests/fuzz/test_engine_fuzz.py (see tests/fuzz/twin.py): after every
call, hetmem and torch.optim.AdamW agree within 1e-5 relative, or hetmem raised a documented
error and its state is unchanged.  Random (not derandomized) unless --seed is given; a failure
prints the shrunk call sequence and exits 1.

    python benchmarks/fuzz_engine.py --examples 2000 [--nvme-share 0.5] [--seed N] [--json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings  # noqa: E402

from tests.fuzz.strategies import ops  # noqa: E402
from tests.fuzz.twin import Pair  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="call sequences to try, per NVMe setting")
    p.add_argument("--max-calls", type=int, default=20, help="calls per sequence, at most")
    p.add_argument("--seed", type=int, default=None, help="reproducible run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def fuzz(nvme: bool, args, stats: collections.Counter) -> str | None:
    """Run the property; returns the failure report (None when every example passed)."""

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(ops(nvme=nvme, max_size=args.max_calls))
    def prop(sequence):
        pair = Pair(nvme=nvme)
        try:
            for op in sequence:
                pair.run(op)
                stats[f"calls.{op[0]}" if op[0] != "fault" else f"calls.fault.{op[3][0]}"] += 1
            stats["sequences"] += 1
            stats["skipped_steps"] += pair.engine.scaler.skipped_steps
            for error in pair.errors:
                stats[f"documented_errors.{error.split(':')[0]}"] += 1
        finally:
            pair.close()

    if args.seed is not None:
        prop = hypothesis_seed(args.seed + int(nvme))(prop)
    try:
        prop()
    except Exception as exc:  # noqa: BLE001 - the report is the product
        found = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]
        return "\n".join(f"{type(e).__name__}: {e} ({'; '.join(getattr(e, '__notes__', []))})" for e in found)
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = {}
    for nvme in (False, True):
        stats: collections.Counter = collections.Counter()
        started = time.perf_counter()
        failure = fuzz(nvme, args, stats)
        results["nvme" if nvme else "memory"] = {"examples": args.examples, "failure": failure,
                                                "seconds": round(time.perf_counter() - started, 1),
                                                "stats": dict(sorted(stats.items()))}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, r in results.items():
            print(f"{name}: {r['examples']} examples in {r['seconds']} s: "
                  f"{'FAILED: ' + r['failure'] if r['failure'] else 'all passed'}")
            for key, value in r["stats"].items():
                print(f"  {key:40s} {value}")
    return 1 if any(r["failure"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
