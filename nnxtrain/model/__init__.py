"""The NNX Llama-style decoder. Holds the model only: no training code lives here."""

from nnxtrain.model.auto import resolve_auto
from nnxtrain.model.layers import activation_dtype
from nnxtrain.model.transformer import Transformer

__all__ = ["Transformer", "activation_dtype", "resolve_auto"]
