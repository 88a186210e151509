"""The `vidaccel` command. Each subcommand lives in `vidaccel.commands.<name>` and provides
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vidaccel.commands.info", "versions, device, kernel backend and presets"),
    "generate": ("vidaccel.commands.generate", "generate a video, dense vs accelerated, with speed and quality"),
    "bench": ("vidaccel.commands.bench", "benchmark presets against dense: time, memory, quality"),
    "demo": ("vidaccel.commands.demo", "the Gradio app: dense vs accelerated side by side in the browser"),
    "plan": ("vidaccel.commands.plan", "measure LeMiCa segment errors and write one step plan per budget"),
    "text-encoder-eval": ("vidaccel.commands.text_encoder_eval",
                          "fidelity of a low-precision text encoder against fp32: per-token cosine and rel L2"),
    "tune": ("vidaccel.commands.tune",
             "search method settings and write the fastest preset that keeps a quality floor (preset JSON)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidaccel", description="Faster diffusers video pipelines.")
    parser.add_argument("--version", action="version", version=f"vidaccel {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
