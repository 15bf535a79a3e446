"""The `hetmem` command: one subcommand per module in hetmem/commands/.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when chosen, so `hetmem env` does not pay for the training code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# errors a user can fix (budgets, config values, checkpoints, files): one line, exit code 2;
# anything else is a bug and keeps its traceback (as do these with --log-level debug)
EXPECTED_ERRORS = (ValueError, OSError)

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("hetmem.commands.train", "train a GPT several times larger than the device budget on the shipped corpus"),
    "env": ("hetmem.commands.env", "report the environment: torch, ops, SIMD, IO backends, GPUs"),
    "bench": ("hetmem.commands.bench", "run a benchmark: adam, nvme, nvme-train, scale, throughput, trace"),
    "profile": ("hetmem.commands.profile", "profile one step of a model: memory by module, the device budget it needs"),
    "export": ("hetmem.commands.export", "write a checkpoint's weights as a .safetensors file"),
    "report": ("hetmem.commands.report", "render a saved run's memory report: text, PNG, HTML, Chrome trace"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetmem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--log-level", default=os.environ.get("HETMEM_LOG", "warning"),
                        help="logging level for hetmem's library logs (default: %(default)s; "
                             "also HETMEM_LOG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (hetmem train --nproc re-runs it)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error(f"--log-level {args.log_level!r} is not a logging level; use debug, info, warning or error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hetmem").setLevel(level)
    command = importlib.import_module(args._module)
    try:
        return int(command.run(args) or 0)
    except EXPECTED_ERRORS as exc:
        if level <= logging.DEBUG:
            raise
        print(f"hetmem {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def version_line() -> str:
    """`hetmem X.Y.Z (torch T)`; torch's version read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from hetmem import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"hetmem {__version__} (torch {torch_version})"


def one_line(exc: BaseException) -> str:
    """The error as one line, with the way to find a budget that fits when it is about budgets."""
    from hetmem.chunk_manager.manager import DeviceBudgetError, HostBudgetError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not str(exc):
        text = f"{type(exc).__name__}: {exc!r}"
    if isinstance(exc, (DeviceBudgetError, HostBudgetError)) or "device_budget" in text or "device budget" in text:
        text += " (`hetmem profile` measures the device budget a model needs)"
    return text


if __name__ == "__main__":
    sys.exit(main())
