"""nnxtrain: a language-model trainer for JAX built on Flax NNX.

The public API for plugin authors and Python users:

    from nnxtrain import Callback, Trainer, compose
    Trainer(compose(["run.steps=50"])).fit()
"""

from nnxtrain.accounting import FlopsReport, count_params, step_flops
from nnxtrain.config import Config, compose
from nnxtrain.errors import ConfigError, LostProcessError, PluginError, UserError
from nnxtrain.events import (
    Callback,
    CompileEvent,
    EvalEndEvent,
    ExceptionEvent,
    LazyMetrics,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainStartEvent,
)
from nnxtrain.sharding import ActivationRecord
from nnxtrain.timing import StepRecord
from nnxtrain.trainer import CompiledMemory, FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "ActivationRecord",
    "Callback",
    "CompileEvent",
    "CompiledMemory",
    "Config",
    "ConfigError",
    "EvalEndEvent",
    "ExceptionEvent",
    "FitResult",
    "FlopsReport",
    "LazyMetrics",
    "LostProcessError",
    "PluginError",
    "SetupEvent",
    "StepEndEvent",
    "StepRecord",
    "TrainEndEvent",
    "TrainStartEvent",
    "Trainer",
    "UserError",
    "compose",
    "count_params",
    "step_flops",
]
