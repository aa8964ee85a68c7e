"""Datasets that feed the trainer global batches of inputs, targets and weights."""

from typing import Any

from nnxtrain.config import Config
from nnxtrain.data.synthetic import Batch, MarkovSource, SyntheticData

__all__ = ["Batch", "MarkovSource", "SyntheticData", "build_dataset"]


def build_dataset(cfg: Config) -> Any:
    """The dataset `data.name` selects (validated in `nnxtrain.config`)."""
    d = cfg.data
    return SyntheticData(cfg.model.vocab_size, d.branching, d.source_seed, cfg.run.seed)
