"""Low-precision text encoders: weight formats, SINQ, Hadamard rotation, in-place quantize/restore, fidelity.

Entry point: ``quantize_text_encoder(encoder, TextEncoderQuant(method="int8"))``; GPTQ calibration with
``TextEncoderQuant(..., calibration="gptq")`` and ``tokenizer=`` (module ``gptq``).
"""

from .eval import TokenFidelity, hf_encode_fn, load_default_prompts, measure_fidelity
from .gptq import load_calibration_prompts
from .quantize import QuantizationResult, TextEncoderQuant, quantize_text_encoder
from .quantized_embedding import QuantizedEmbedding
from .quantized_linear import METHODS, QuantizedLinear

__all__ = [
    "METHODS",
    "QuantizationResult",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "TextEncoderQuant",
    "TokenFidelity",
    "hf_encode_fn",
    "load_calibration_prompts",
    "load_default_prompts",
    "measure_fidelity",
    "quantize_text_encoder",
]
