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
  cannot be reached within `mesh.init_timeout` seconds is a one-line error, and so are
  processes that never join: JAX's client aborts the process with a C++ stack when its
  registration times out (its `connect()` cannot report that to Python, and the hook
  that could replace the abort is not reachable from Python), so a watchdog thread ends
  the process with the one line first, and JAX gets a longer deadline than the watchdog
  (from Python too: JAX would end the process anyway). Process 0 also checks that the
  coordinator's port is free before JAX binds it.
"""

import math
import os
import socket
import sys
import threading
import time

import jax

from nnxtrain.config import Config, MeshConfig
from nnxtrain.errors import EXIT_BAD_INPUT, ConfigError, UserError, first_line
from nnxtrain.parallel.target import quiet_libtpu

# JAX's own deadline for all processes to join is this much later than mesh.init_timeout,
# so that the watchdog, not JAX's abort, reports processes that never joined.
JAX_DEADLINE_MARGIN = 30

# Auto never asks for more CPU devices than this: each device's share of the step must stay
# big enough to pay for its collectives (measured on 2 cores only; larger hosts untested).
AUTO_MAX_CPU_DEVICES = 8


def auto_host_devices(cfg: Config, cores: int | None = None) -> int:
    """The CPU device count `run.host_devices=-1` asks for; 0 leaves JAX's default.

    Every mesh axis given: their product. Otherwise the most devices, up to one per core
    (and `AUTO_MAX_CPU_DEVICES`), that the mesh's fixed axes and the micro-batch split into.
    Multi-process runs and an XLA_FLAGS device count keep JAX's default.
    """
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert)
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
        batch_split = n if cfg.mesh.tensor != -1 else known  # data * fsdp * expert
        if batch == -1 or (batch % accum == 0 and (batch // accum) % batch_split == 0):
            return n
    return 0


def start_jax(cfg: Config) -> None:
    """Applies host_devices and joins the distributed run, once per process."""
    quiet_libtpu()  # with nnxtrain[tpu] on a host without TPU chips
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
        _join(m)


def _join(m: MeshConfig) -> None:
    """jax.distributed.initialize, within mesh.init_timeout or one line and exit 2."""
    auto = m.num_processes == -1
    if not auto and m.process_id != 0:
        _wait_for_coordinator(m.coordinator, m.init_timeout)
    if not auto and m.process_id == 0:
        _check_port_free(m.coordinator)
    joined = threading.Event()
    watchdog = threading.Thread(target=_give_up_unless, args=(joined, m), daemon=True)
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=None if auto else m.coordinator,
            num_processes=None if auto else m.num_processes,
            process_id=None if auto else m.process_id,
            initialization_timeout=m.init_timeout + JAX_DEADLINE_MARGIN,
            heartbeat_timeout_seconds=m.heartbeat_timeout,
        )
    except Exception as e:
        if auto:
            raise UserError(
                f"mesh.num_processes: -1 found no cluster to join ({first_line(e)}). Fix: "
                "run under SLURM, Open MPI or another cluster JAX detects, or give "
                "mesh.coordinator, mesh.num_processes and mesh.process_id."
            ) from e
        raise UserError(
            f"mesh.coordinator: could not join the distributed run at {m.coordinator} "
            f"({first_line(e)}). Fix: start every process with the same mesh.coordinator, "
            "reachable from all, and distinct mesh.process_id."
        ) from e
    finally:
        joined.set()


def _give_up_unless(joined: threading.Event, m: MeshConfig) -> None:
    """Ends the process with one line unless `joined` is set within mesh.init_timeout.

    The main thread is inside JAX's connect (a C++ call that releases the GIL) and cannot
    be interrupted, so this thread exits the process itself, as the CLI would for a
    UserError; JAX's abort would come later, with a C++ stack trace."""
    if joined.wait(m.init_timeout):
        return
    who = f"process {m.process_id}" if m.num_processes != -1 else "this process"
    of = f"all {m.num_processes}" if m.num_processes != -1 else "all"
    print(
        f"nnxtrain: error: mesh.num_processes: {who} waited {m.init_timeout} s at "
        f"{m.coordinator or 'the auto-detected coordinator'} for {of} processes to join, "
        "and some never did. Fix: start every process with the same mesh.coordinator and "
        "mesh.num_processes and its own mesh.process_id, or raise mesh.init_timeout.",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(EXIT_BAD_INPUT)


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


def _check_port_free(address: str) -> None:
    """Process 0: another program (another run's coordinator?) must not hold the port
    that JAX's coordination service is about to bind on every interface."""
    port = int(address.rpartition(":")[2])
    with socket.socket() as s:
        # As gRPC does: a port that a previous run's closed connections still hold
        # (TIME_WAIT) is free; one that a program listens on is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConfigError(
                "mesh.coordinator",
                f"port {port} is already in use on this host ({e.strerror})",
                "stop what holds it (another run?) or choose another port",
            ) from e


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """Waits until process 0 listens at `address`; JAX would abort the process instead."""
    host, _, port = address.rpartition(":")
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
