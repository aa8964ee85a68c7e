"""The batch every data source gives the train step: a dict of [rows, seq_len] numpy arrays.

    inputs       int32    the tokens the model reads
    targets      int32    the next token of each position
    weights      float32  1 where the target counts in the loss, 0 for padding and prompts
    segment_ids  int32    1, 2, ... per document of a row, 0 for padding
    positions    int32    each token's place in its document

The last two are there when documents are masked (data.document_mask): the model then
attends within each document only. Synthetic data gives the first three.
"""

import numpy as np

Batch = dict[str, np.ndarray]
