"""`vidaccel info`: what is installed and what would run here."""

from __future__ import annotations

import argparse
import json
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def environment_info() -> dict:
    import diffusers
    import torch
    import transformers

    from .. import __version__, list_presets
    from ..adapters import supported_pipelines
    from ..kernels_backend import kernel_backend

    info = {
        "vidaccel": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "kernel_backend": kernel_backend(),
        "presets": list_presets(),
        "supported_pipelines": supported_pipelines(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")
    return 0
