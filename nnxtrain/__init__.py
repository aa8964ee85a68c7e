"""nnxtrain: a language-model trainer for JAX built on Flax NNX.

The public API for plugin authors and Python users:

    from nnxtrain import Callback, Trainer, compose
    Trainer(compose(["run.steps=50"])).fit()
    model = nnxtrain.hf.load("path/to/hf-llama")   # Hugging Face weights in (and hf.save out)
    new_tokens = generate(model, prompts, max_new_tokens=32)   # KV-cached decoding
"""

from nnxtrain import hf
from nnxtrain.accounting import FlopsReport, count_params, step_flops
from nnxtrain.compile import CompiledMemory, CompiledStep
from nnxtrain.config import Config, compose
from nnxtrain.data import run_tokenizer
from nnxtrain.errors import ConfigError, LostProcessError, PluginError, UserError, first_line
from nnxtrain.events import (
    Callback,
    CompileEvent,
    EvalEndEvent,
    ExceptionEvent,
    GoodputEvent,
    LazyMetrics,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
)
from nnxtrain.generation import generate
from nnxtrain.goodput import Goodput, GoodputReport
from nnxtrain.records import drop_records_after
from nnxtrain.runlock import RunLock
from nnxtrain.sharding import ActivationRecord
from nnxtrain.step import METRIC_NAMES, all_finite
from nnxtrain.timing import StepRecord
from nnxtrain.trainer import FitResult, Trainer
from nnxtrain.units import format_bytes

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "ActivationRecord",
    "Callback",
    "CompileEvent",
    "CompiledMemory",
    "CompiledStep",
    "Config",
    "ConfigError",
    "EvalEndEvent",
    "ExceptionEvent",
    "FitResult",
    "FlopsReport",
    "Goodput",
    "GoodputEvent",
    "GoodputReport",
    "LazyMetrics",
    "LostProcessError",
    "PluginError",
    "RunLock",
    "SetupEvent",
    "StepEndEvent",
    "StepRecord",
    "TrainEndEvent",
    "TrainStartEvent",
    "Trainer",
    "TrainerView",
    "UserError",
    "all_finite",
    "compose",
    "count_params",
    "drop_records_after",
    "first_line",
    "format_bytes",
    "generate",
    "hf",
    "run_tokenizer",
    "step_flops",
]
