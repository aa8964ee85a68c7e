"""`nnxtrain.hf`, the public name of `nnxtrain.interop.hf`: Hugging Face Llama in and out.

import nnxtrain.hf
model = nnxtrain.hf.load("TinyLlama-1.1B")
nnxtrain.hf.save(model, "out", dtype="bfloat16")
"""

from nnxtrain.interop.hf import TOKENIZER_FILES, load, save

__all__ = ["TOKENIZER_FILES", "load", "save"]
