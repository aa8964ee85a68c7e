"""The goodput account: every second of a run's wall time, charged to exactly one bucket.

    account = Goodput(started=t0)            # t0: the process's start (None: now)
    with account.timed("compile"):           # time inside goes to "compile" ...
        with account.timed("callbacks/x"):   # ... except what a nested bucket takes
            ...
    report = account.report()                # GoodputReport: seconds per bucket, shares

The account is a stack of buckets on the host's timeline: at any moment the innermost open
bucket is charged, and time outside every bucket is `other`. So the buckets sum to the wall
time by construction, and a plugin's wait for a step's metrics (`step`) or a checkpointer's
blocking save (`checkpoint`) inside its hook is charged to what it waited for, not to the
plugin. The buckets:

    startup     before the account existed: from `started` (the CLI: the process's start,
                Python's imports, Hydra composing the config) to the Trainer's creation
    init        JAX start-up, the dataset, the mesh, planning and initialising the state
    compile     tracing and compiling the train and eval steps (cache hits counted)
    restore     reading a checkpoint (the checkpointer charges it)
    step        productive: the loop dispatching and waiting on train steps
    data        the host getting the next batch (the dataset's producer was behind)
    checkpoint  time the loop was held by a save (the checkpointer charges it)
    eval        evaluation passes
    callbacks/NAME  time in plugin NAME's hooks, not charged to the above
    lost        steps trained in an earlier attempt after its last checkpoint: recomputed
    other       everything else (printing, writing records, Python between phases)

Across restarts of one run dir the totals accumulate (`resume`): an earlier attempt's
seconds are added, and its productive time on the steps after the restored one moves to
`lost`. The productive seconds of each loop iteration are kept for its last `LEDGER`
steps; before those, lost steps are costed at its mean. The trainer keeps the account in
run_info.json while it trains (every `run.goodput_every` seconds, `keep_due`), so an
attempt killed without a chance to write it at its end (SIGKILL, a lost machine) is
counted up to the last time it was kept; its seconds after that are missing.
"""

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

BUCKETS = (
    "startup",
    "init",
    "compile",
    "restore",
    "step",
    "data",
    "checkpoint",
    "eval",
    "callbacks",
    "lost",
    "other",
)
LEDGER = 4096  # steps whose times the account keeps, to cost lost work after a resume

_cache_hits = [0]  # persistent compilation cache hits in this process (see cache_hits)
_listening = [False]


def _count_hit(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


def cache_hits() -> int:
    """Persistent compilation cache hits so far in this process (JAX's monitoring events;
    the listener is registered on the first call)."""
    if not _listening[0]:
        import jax.monitoring

        jax.monitoring.register_event_listener(_count_hit)
        _listening[0] = True
    return _cache_hits[0]


@dataclass(frozen=True)
class GoodputReport:
    """The account at one moment, over every attempt of the run dir.

    `seconds` has one entry per bucket of BUCKETS except `callbacks`, which is split per
    plugin as `callbacks/NAME`; `wall` is their sum."""

    seconds: Mapping[str, float]
    wall: float
    attempts: int  # runs of this run dir accounted for, this one included
    lost_steps: int  # steps trained again after resumes
    compiles: int  # steps compiled by this attempt
    cache_hits: int  # of which loaded from the persistent compilation cache

    @property
    def goodput(self) -> float:
        """The productive share of the wall time (0..1)."""
        return self.seconds.get("step", 0.0) / self.wall if self.wall > 0 else 0.0

    @property
    def callbacks(self) -> float:
        return sum(v for k, v in self.seconds.items() if k.startswith("callbacks/"))

    def as_dict(self) -> dict[str, Any]:
        """What run_info.json's "goodput" holds: seconds and shares per bucket."""
        return {
            "wall_seconds": self.wall,
            "goodput": self.goodput,
            "attempts": self.attempts,
            "lost_steps": self.lost_steps,
            "compiles": self.compiles,
            "compile_cache_hits": self.cache_hits,
            "seconds": dict(self.seconds),
            "shares": {k: v / self.wall if self.wall > 0 else 0.0 for k, v in self.seconds.items()},
        }

    def rows(self) -> list[tuple[str, float, float]]:
        """(bucket, seconds, share) in BUCKETS order, plugins under `callbacks`."""
        out = []
        for bucket in BUCKETS:
            names = (
                sorted(k for k in self.seconds if k.startswith("callbacks/"))
                if bucket == "callbacks"
                else [bucket]
            )
            for name in names:
                s = self.seconds.get(name, 0.0)
                out.append((name, s, s / self.wall if self.wall > 0 else 0.0))
        return out


@dataclass
class _Earlier:
    """What earlier attempts of the run dir left in run_info.json's "goodput"."""

    seconds: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    lost_steps: int = 0


class Goodput:
    """The account of one attempt (plus earlier ones, after `resume`); see the module."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, started: float | None = None
    ):
        """`started`: when the run began before the account (on `clock`'s timeline); the
        time since is `startup`. None: the run begins now."""
        self._clock = clock
        self._stack = ["other"]
        self._last = self._kept_at = clock()
        startup = self._last - started if started is not None else 0.0
        self._seconds: dict[str, float] = {"startup": max(startup, 0.0)}
        self._earlier = _Earlier()
        self._ledger: dict[int, float] = {}  # step -> productive seconds of its iteration
        self._ledger_total = 0.0  # the step bucket when the last iteration was recorded
        self.compiles = 0
        self.cache_hits = 0

    def _charge(self) -> None:
        now = self._clock()
        top = self._stack[-1]
        self._seconds[top] = self._seconds.get(top, 0.0) + (now - self._last)
        self._last = now

    @contextmanager
    def timed(self, bucket: str) -> Iterator[None]:
        """Charges the time inside to `bucket` (a name of BUCKETS, or `callbacks/NAME`),
        except what buckets opened inside it take."""
        self._charge()
        self._stack.append(bucket)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def step_done(self, step: int) -> None:
        """Ends the loop's iteration of `step`: its productive seconds go in the ledger of
        the last LEDGER steps (what a resume costs as lost, should it come to that)."""
        self._charge()
        total = self._seconds.get("step", 0.0)
        self._ledger[step] = total - self._ledger_total
        self._ledger_total = total
        while len(self._ledger) > LEDGER:
            del self._ledger[next(iter(self._ledger))]  # the oldest

    def keep_due(self, every: float) -> bool:
        """Whether `every` seconds have passed since the account was last kept (`state()`)
        or began: the trainer then writes it to run_info.json, for a killed attempt."""
        return self._clock() - self._kept_at >= every

    def resume(self, earlier: Mapping[str, Any] | None, restored_step: int) -> None:
        """Adds the earlier attempts' account (run_info.json's "goodput" as `state()` wrote
        it) to this one; their productive time on steps after `restored_step` is lost."""
        if not earlier or not isinstance(earlier.get("seconds"), dict):
            return
        seconds = {k: float(v) for k, v in earlier["seconds"].items()}
        ledger = {int(k): float(v) for k, v in earlier.get("step_seconds", {}).items()}
        last = int(earlier.get("last_step", restored_step))
        lost_steps = max(last - restored_step, 0)
        mean = float(earlier.get("mean_step_seconds", 0.0))
        lost = sum(ledger.get(s, mean) for s in range(restored_step + 1, last + 1))
        lost = min(lost, seconds.get("step", 0.0))
        seconds["step"] = seconds.get("step", 0.0) - lost  # it was productive, then lost
        seconds["lost"] = seconds.get("lost", 0.0) + lost
        self._earlier = _Earlier(
            seconds,
            int(earlier.get("attempts", 1)),
            int(earlier.get("lost_steps", 0)) + lost_steps,
        )

    def report(self) -> GoodputReport:
        """The account now, this attempt and the earlier ones together."""
        self._charge()
        seconds = dict.fromkeys((b for b in BUCKETS if b != "callbacks"), 0.0)
        for source in (self._earlier.seconds, self._seconds):
            for k, v in source.items():
                seconds[k] = seconds.get(k, 0.0) + v
        return GoodputReport(
            seconds,
            sum(seconds.values()),
            self._earlier.attempts + 1,
            self._earlier.lost_steps,
            self.compiles,
            self.cache_hits,
        )

    def state(self, last_step: int) -> dict[str, Any]:
        """The report as run_info.json keeps it, with what a resumed attempt needs to cost
        lost work: the last step, the ledger of recent steps' productive seconds and its
        mean."""
        if self._ledger and last_step not in self._ledger:  # the loop ended inside its iteration
            self.step_done(last_step)
        self._kept_at = self._clock()
        recent = self._ledger
        mean = sum(recent.values()) / len(recent) if recent else 0.0
        return {
            **self.report().as_dict(),
            "last_step": last_step,
            "mean_step_seconds": mean,
            "step_seconds": {str(k): round(v, 6) for k, v in recent.items()},
        }


def table(report: GoodputReport) -> Any:
    """The account as a rich table (printed at the end of a run)."""
    from rich.table import Table

    title = (
        f"goodput {100 * report.goodput:.1f}% of {report.wall:.1f} s"
        + (f" over {report.attempts} attempts" if report.attempts > 1 else "")
        + (f", {report.lost_steps} steps lost" if report.lost_steps else "")
    )
    t = Table(title=title, title_justify="left")
    t.add_column("bucket")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    for name, s, share in report.rows():
        label = name
        if name == "compile" and report.compiles:
            label = f"compile ({report.cache_hits}/{report.compiles} from cache)"
        t.add_row(label, f"{s:.2f}", f"{100 * share:.1f}%")
    return t
