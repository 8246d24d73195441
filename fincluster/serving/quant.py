"""Quantized span weights through bitsandbytes: LLM.int8 (int8 with outlier decomposition) or NF4.

Every ``nn.Linear`` inside the span's decoder layers is replaced by bitsandbytes' layer with the same
weights (norms, rotary buffers and the client part stay as they are); the layers themselves stay
transformers' code, calling the replaced projections. bitsandbytes quantizes the weights when the
module moves to its device, and runs on CPU as well as CUDA (checked with bitsandbytes 0.50.2).
bitsandbytes is the optional extra ``quant`` (``pip install fincluster[quant]``).
"""

from __future__ import annotations

from typing import Any

import torch

from fincluster.errors import ConfigurationError
from fincluster.serving.span_model import SpanModel
from fincluster.values import Quantization

INT8_OUTLIER_THRESHOLD = 6.0
"""LLM.int8's default: input features above this magnitude are computed in 16 bits."""


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigurationError(
            "--quant int8/nf4 needs bitsandbytes: pip install 'fincluster[quant]'"
        ) from None
    return bitsandbytes


def _quantized(linear: torch.nn.Linear, mode: Quantization, compute_dtype: torch.dtype) -> torch.nn.Module:
    bnb = _bitsandbytes()
    bias = linear.bias is not None
    layer: torch.nn.Module
    if mode is Quantization.INT8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=INT8_OUTLIER_THRESHOLD,
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            quant_type="nf4",
            compute_dtype=compute_dtype,
        )
    layer.load_state_dict(linear.state_dict())
    return layer


def quantize(model: SpanModel, mode: Quantization, device: torch.device | str) -> SpanModel:
    """Replace the span's linear layers by ``mode``'s and move it to ``device`` (where bitsandbytes
    quantizes them). ``none`` only moves it."""
    if mode is not Quantization.NONE:
        model.base.to("cpu")
        for layer in model.base.layers:
            for name, child in list(layer.named_modules()):
                if isinstance(child, torch.nn.Linear):
                    parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                    setattr(parent, name.rsplit(".", 1)[-1], _quantized(child, mode, model.dtype))
    model.base.to(device)
    model.quantization = mode
    return model


def weight_bytes_per_block(model: SpanModel) -> list[int]:
    """Bytes of parameters and buffers each block holds, with bitsandbytes' quantization statistics
    (int8 row scales, NF4 block absmax) for a quantized span."""
    bnb = _bitsandbytes() if model.quantization is not Quantization.NONE else None
    sizes = []
    for layer in model.base.layers:
        tensors = [*layer.parameters(), *layer.buffers()]
        if bnb is not None:
            for weight in layer.parameters():
                if isinstance(weight, bnb.nn.Int8Params) and weight.SCB is not None:
                    tensors.append(weight.SCB)
                elif isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
                    state = weight.quant_state
                    tensors.append(state.absmax)
                    if state.state2 is not None:
                        tensors.append(state.state2.absmax)
        sizes.append(sum(tensor.numel() * tensor.element_size() for tensor in tensors))
    return sizes
