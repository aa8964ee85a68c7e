"""Other formats in and out: `hf` (Hugging Face Llama directories; public as `nnxtrain.hf`)
and `init_from` (`run.init_from=PATH`: a model's shape at compose time, its weights into
the run's shards after init). Imports config, model, parallel and checkpoint.
"""
