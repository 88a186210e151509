"""vidaccel: faster diffusers video pipelines with measured quality.

    import vidaccel
    handle = vidaccel.apply(pipe, "dense")
    video = pipe(prompt).frames[0]
    print(handle.stats()); handle.remove()
"""

from .api import AccelHandle, active_handle, apply
from .attention.dense import DenseAttention
from .attention.radial_method import RadialAttention
from .attention.svg2 import SVG2Attention
from .caching import DBCache, LeMiCa
from .errors import AlreadyAcceleratedError, UnsupportedPipelineError
from .preset_files import load_preset_file, save_preset_file
from .presets import Preset, list_presets
from .text_encoder import TextEncoderQuant

__version__ = "0.1.0"


def __getattr__(name: str):
    # The reference model's loader pulls in its text-encoder wrapper; load it on first use only.
    if name == "reference_pipeline":
        from .reference import reference_pipeline

        return reference_pipeline
    raise AttributeError(f"module 'vidaccel' has no attribute {name!r}")


__all__ = [
    "AccelHandle", "AlreadyAcceleratedError", "DBCache", "DenseAttention", "LeMiCa", "Preset", "RadialAttention",
    "SVG2Attention", "TextEncoderQuant", "UnsupportedPipelineError", "active_handle", "apply", "list_presets",
    "load_preset_file", "reference_pipeline", "save_preset_file", "__version__",
]
