"""The training loop and the plugin API it fires.

- the loop: `trainer` (the `Trainer`), `result` (what `fit()` returns: `FitResult`),
  `step` (the compiled train and eval steps),
  `compile` (planning the state and compiling ahead of time), `feed` (placing batches),
  `timing` (step completions), `goodput` (where the wall time went), `accounting`
  (parameters and FLOPs), `report` (the header and run_info.json);
- the plugin API: `events` (`Callback` and the event objects), `hooks` (firing them),
  `registry` (building callbacks from config), `controls` (stop, save, skip bad steps).

It imports config, model, data, parallel, run, checkpoint and interop, and never a plugin.
"""
