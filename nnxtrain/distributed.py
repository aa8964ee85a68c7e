"""Starting JAX for a run: simulated CPU devices, the compilation cache, multiple processes.

`start_jax(cfg)` must run before JAX creates its backends (the Trainer calls it first thing):

- `run.host_devices=N` gives the CPU backend N devices (`jax_num_cpu_devices`), so a
  laptop can compile and run the sharded step of an 8-device mesh without XLA_FLAGS.
  `-1` (auto, the default) gives it the mesh's size when every mesh axis is given, else
  one device per CPU core (at most 8, and only as many as split the batch): each XLA CPU
  device runs its part of the step on its own thread, where one device leaves cores idle
  between the small ops of a small model (the char model's step: 64 -> 48 ms on 2 cores).
- `run.compile_cache=DIR` keeps compiled steps on disk (JAX's persistent compilation
  cache; `auto`, the default, is $XDG_CACHE_HOME/nnxtrain/jax, i.e. ~/.cache/nnxtrain/jax;
  "" turns it off), so a second start skips XLA's compile.
- `mesh.coordinator=HOST:PORT mesh.num_processes=P mesh.process_id=I` joins a multi-process
  run through `jax.distributed.initialize`; `mesh.num_processes=-1` lets JAX detect the
  cluster from the environment (SLURM, Open MPI, Kubernetes, ...). A coordinator that
  cannot be reached within `mesh.init_timeout` seconds is a one-line error.
"""

import math
import os
import socket
import time

import jax

from nnxtrain.config import Config
from nnxtrain.errors import ConfigError, UserError, first_line

# Auto never asks for more CPU devices than this: each device's share of the step must stay
# big enough to pay for its collectives (measured on 2 cores only; larger hosts untested).
AUTO_MAX_CPU_DEVICES = 8


def auto_host_devices(cfg: Config, cores: int | None = None) -> int:
    """The CPU device count `run.host_devices=-1` asks for; 0 leaves JAX's default.

    Every mesh axis given: their product. Otherwise the most devices, up to one per core
    (and `AUTO_MAX_CPU_DEVICES`), that the mesh's fixed axes and the micro-batch split into.
    Multi-process runs and an XLA_FLAGS device count keep JAX's default.
    """
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if -1 not in sizes:
        return math.prod(sizes)
    if cfg.mesh.num_processes != 1 or "xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", ""
    ):
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    known = math.prod(s for s in sizes if s != -1)
    batch, accum = cfg.run.batch_size, cfg.run.grad_accum
    for n in range(min(cores or 1, AUTO_MAX_CPU_DEVICES), 1, -1):
        if n % known:
            continue
        batch_split = n if cfg.mesh.tensor != -1 else cfg.mesh.data * cfg.mesh.fsdp
        if batch == -1 or (batch % accum == 0 and (batch // accum) % batch_split == 0):
            return n
    return 0


def start_jax(cfg: Config) -> None:
    """Applies host_devices and joins the distributed run, once per process."""
    explicit = cfg.run.host_devices != -1
    n = cfg.run.host_devices if explicit else auto_host_devices(cfg)
    cpu_devices = getattr(jax.config, "jax_num_cpu_devices", -1)
    if n and cpu_devices != n and (explicit or cpu_devices == -1):
        if cpu_devices != -1:
            raise ConfigError(
                "run.host_devices",
                f"this process already runs with {cpu_devices} CPU devices",
                "use the same value in every run of one process",
            )
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError as e:
            if explicit:  # auto keeps the devices of a JAX that already runs
                raise ConfigError(
                    "run.host_devices",
                    "JAX already started in this process",
                    "set it before the first JAX computation (the CLI does)",
                ) from e
    _use_compile_cache(cfg.run.compile_cache)
    m = cfg.mesh
    if (m.coordinator or m.num_processes != 1) and not jax.distributed.is_initialized():
        auto = m.num_processes == -1
        if not auto and m.process_id != 0:
            _wait_for_coordinator(m.coordinator, m.init_timeout)
        try:
            jax.distributed.initialize(
                coordinator_address=None if auto else m.coordinator,
                num_processes=None if auto else m.num_processes,
                process_id=None if auto else m.process_id,
                initialization_timeout=m.init_timeout,
                heartbeat_timeout_seconds=m.heartbeat_timeout,
            )
        except Exception as e:
            raise UserError(
                f"mesh.coordinator: could not join the distributed run at "
                f"{m.coordinator or '<auto-detected>'} within {m.init_timeout} s "
                f"({first_line(e)}). Fix: start "
                "every process with the same mesh.coordinator, reachable from all, "
                "and distinct mesh.process_id."
            ) from e


def _use_compile_cache(directory: str) -> None:
    """Points JAX's persistent compilation cache at `directory` ('' turns it off)."""
    if directory == "auto":  # the XDG user cache, ~/.cache unless XDG_CACHE_HOME says else
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        directory = os.path.join(cache_home, "nnxtrain", "jax")
    path = os.path.expanduser(directory) if directory else None
    if path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                "run.compile_cache",
                f"cannot create {path!r} ({e.strerror})",
                'choose a writable directory or "" to turn the cache off',
            ) from e
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every compiled step, not only those that took over a second to build.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """Waits until process 0 listens at `address`; JAX would abort the process instead."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            "mesh.coordinator",
            f"{address!r} is not HOST:PORT",
            "use e.g. mesh.coordinator=127.0.0.1:29500",
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"mesh.coordinator: nothing answers at {address} after {timeout} s "
                    f"({e.strerror or e}). Fix: start process 0 first, or check the address "
                    "and mesh.init_timeout."
                ) from e
            time.sleep(0.5)
