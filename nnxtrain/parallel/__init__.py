"""Devices and how arrays spread over them.

`mesh` (the device mesh and the batch per process), `sharding` (logical axis names to mesh
axes), `distributed` (JAX's multi-process start-up), `preemption` (every process agreeing
on a signal), `target` (the devices of hardware that is not attached), `collectives` (what
a compiled step moves between devices). Imports config and the leaves only.
"""
