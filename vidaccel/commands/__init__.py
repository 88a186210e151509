"""Subcommands of the `vidaccel` CLI (see vidaccel.cli)."""
