"""The console commands, one file each: `train` (`nnxtrain`), `generate`
(`nnxtrain-generate`), `export` (`nnxtrain-export`), `plugins` (`nnxtrain-plugins`); and
what they share: `overrides` (checking a command line before Hydra) and `sweep` (a
multirun's summary). The only room that may import every other.
"""
