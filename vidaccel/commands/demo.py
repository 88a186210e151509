"""`vidaccel demo`: the Gradio app (demos/app.py), dense vs accelerated side by side in the browser."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# Where the app lives in a source checkout (the repository's demos/ folder, next to the vidaccel package).
SOURCE_APP = Path(__file__).resolve().parents[2] / "demos" / "app.py"
INSTALL_HINT = "pip install 'vidaccel[demo]' (or: pip install gradio)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local diffusers model folder (default: the shipped reference model)")
    source.add_argument("--tiny", help="a tiny random-weight test pipeline kind (wan, wan2.2, hunyuan, cogvideox)")
    parser.add_argument("--device", help="cuda or cpu (default: best available)")
    parser.add_argument("--steps", type=int, help="the page's default step count (default: the model's)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy small CPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the demo to your network)")
    parser.add_argument("--port", type=int, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--plans-dir", help="folder searched for LeMiCa plan files *lemica*.json "
                                            "(default: the repository's assets/)")
    parser.add_argument("--max-video-tokens", type=int,
                        help="largest video (in transformer tokens) the page accepts (default: twice the model's "
                             "default video)")


def load_app() -> ModuleType:
    """The app module: `vidaccel.demos.app` where the package installs demos/ under that name, else demos/app.py
    of the source checkout this vidaccel runs from."""
    try:
        return importlib.import_module("vidaccel.demos.app")
    except ModuleNotFoundError as error:
        if error.name not in ("vidaccel.demos", "vidaccel.demos.app"):
            raise
    if not SOURCE_APP.is_file():
        raise FileNotFoundError(f"the demo app was not found at {SOURCE_APP}; it ships with the vidaccel source "
                                "repository (demos/app.py)")
    name = "vidaccel_demo_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SOURCE_APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        print(f"vidaccel demo needs gradio: {INSTALL_HINT}", file=sys.stderr)
        return 1
    return load_app().serve(args)
