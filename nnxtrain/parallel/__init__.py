"""Devices and how arrays spread over them.

`mesh` (the device mesh and the batch per process), `sharding` (logical axis names to mesh
axes), `distributed` (JAX's multi-process start-up), `preemption` (every process agreeing
on a signal). Imports config and the leaves only.
"""
