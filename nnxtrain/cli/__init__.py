"""The console commands, one file each: `train` (`nnxtrain`), `generate`
(`nnxtrain-generate`), `export` (`nnxtrain-export`), `plugins` (`nnxtrain-plugins`); and
what they share: `overrides` (checking a command line before Hydra), `sweep` (a
multirun's summary) and `bad_input` (the one-line error every command ends bad input
with). The only room that may import every other.
"""
