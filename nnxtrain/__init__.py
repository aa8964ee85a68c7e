"""nnxtrain: a language-model trainer for JAX built on Flax NNX.

The public API for plugin authors and Python users: the names below, and the packages
`nnxtrain.hf` (Hugging Face in and out) and `nnxtrain.checkpoint` (the checkpoint format).
docs/architecture.md maps the rooms behind them.

    from nnxtrain import Callback, Trainer, compose
    Trainer(compose(["run.steps=50"])).fit()
    model = nnxtrain.hf.load("path/to/hf-llama")   # Hugging Face weights in (and hf.save out)
    new_tokens = generate(model, prompts, max_new_tokens=32)   # KV-cached decoding
"""

from nnxtrain import hf
from nnxtrain.config import Config
from nnxtrain.data import run_tokenizer
from nnxtrain.errors import (
    ConfigError,
    LostProcessError,
    PluginError,
    UserError,
    check_int,
    first_line,
)
from nnxtrain.interop.init_from import compose
from nnxtrain.jsonio import json_line
from nnxtrain.model.generation import generate
from nnxtrain.parallel.sharding import ActivationRecord
from nnxtrain.run.lock import RunLock
from nnxtrain.run.records import drop_records_after
from nnxtrain.train.accounting import FlopsReport, count_params, step_flops
from nnxtrain.train.compile import CompiledMemory, CompiledStep
from nnxtrain.train.events import (
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
from nnxtrain.train.goodput import Goodput, GoodputReport
from nnxtrain.train.result import FitResult
from nnxtrain.train.step import METRIC_NAMES, MOE_METRIC_NAMES, all_finite, without_loss
from nnxtrain.train.timing import StepRecord
from nnxtrain.train.trainer import Trainer
from nnxtrain.units import format_bytes

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "MOE_METRIC_NAMES",
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
    "check_int",
    "compose",
    "count_params",
    "drop_records_after",
    "first_line",
    "format_bytes",
    "generate",
    "hf",
    "json_line",
    "run_tokenizer",
    "step_flops",
    "without_loss",
]
