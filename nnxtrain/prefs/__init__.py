"""Preference training: the DPO loss and its metrics as pure functions (`dpo`).

The train step (`nnxtrain.train.step`) calls `dpo.pair_sums` in place of the
cross-entropy sums when data=preference; `nnxtrain.train.preference` builds the reference
the loss compares against. docs/preference.md has the formulas.
"""

from nnxtrain.prefs.dpo import DPO_METRICS, pair_sums, row_logps, sequence_logps

__all__ = ["DPO_METRICS", "pair_sums", "row_logps", "sequence_logps"]
