"""The NNX Llama-style decoder. Holds the model only: no training code lives here."""

from nnxtrain.model.auto import resolve_auto
from nnxtrain.model.layers import activation_dtype
from nnxtrain.model.lora import adapters_off, lora_scale, trainable
from nnxtrain.model.transformer import Transformer

__all__ = [
    "Transformer",
    "activation_dtype",
    "adapters_off",
    "lora_scale",
    "resolve_auto",
    "trainable",
]
