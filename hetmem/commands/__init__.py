"""Subcommands of the `hetmem` CLI; see hetmem/cli.py."""
