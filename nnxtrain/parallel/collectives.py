"""What the compiled step moves between devices: its collectives, counted from the HLO.

    account = parse_collectives(compiled.as_text())
    account.bytes("all-gather")        # per step, per device
    account.received("all-gather")     # what a ring brings into each device

Every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute of the
compiled (optimised, partitioned) module is counted per step and per device, in the
bytes of the buffer it works on:

- all-gather: its gathered output (the whole array each device ends with);
- reduce-scatter: its whole input (what each device contributes before the split);
- all-reduce, all-to-all, collective-permute: the buffer (output size).

A tuple-shaped collective counts the sum of its elements; an async pair
(`all-gather-start` / `all-gather-done`) counts once. A collective inside a `while` body
(the scanned layers, gradient accumulation) counts once per iteration, and inside nested
loops, calls and fusions the trip counts multiply. The trip count is XLA's
`known_trip_count` where the HLO carries it (CPU, GPU), else read off the loop condition
(`counter < N`, as XLA:TPU leaves it) and the counter's start; a loop whose count cannot be
read counts once and is reported (`unknown_loops`). Both branches of a conditional count
once (an upper bound).

In this convention FSDP needs, per step and device, 2 x the gathered parameters' bytes of
all-gather (forward and again backward) and 1 x their bytes of reduce-scatter (the
gradients): `FsdpTheory`. What a ring actually brings into each device is (n-1)/n of the
buffer for an all-gather, reduce-scatter or all-to-all over n devices, and twice that for
an all-reduce (a reduce-scatter then an all-gather): `received`.

XLA:TPU writes a reduce-scatter as a fusion named `all-reduce-scatter.N` that holds an
all-reduce and a dynamic-slice of it; it runs as one reduce-scatter, so the all-reduce in
it is counted as a reduce-scatter of its input. XLA:CPU has no reduce-scatter: gradients
reduced there show as all-reduces.
"""

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# The attributes naming computations an instruction runs (`condition` runs once more than
# the body and holds no collective, so it is not followed).
_CALLS = re.compile(r"\b(calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
# `%name (params) -> type {` or `ENTRY %name ... {` opens a computation; `}` alone ends it.
_HEADER = re.compile(r"(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->.*)?\{\s*$")
_STARTS = re.compile(r"\s+(ROOT\s+)?%?[\w.\-]+\s*=\s")  # an instruction's first line
_ARRAY = re.compile(r"\b(pred|token|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")
_BITS = {"pred": 8, "token": 0}  # the rest say theirs: bf16, s32, f8e4m3fn, c64
_COMPARE = {"LT": 0, "LE": 1, "NE": 0}  # the counter runs from its start up to N (+1)
_FLIP = {"GT": "LT", "GE": "LE", "NE": "NE"}  # `N > counter` is `counter < N`


@dataclass(frozen=True)
class Instruction:
    """One HLO instruction, as text: `%name = type opcode(args), attrs`."""

    name: str
    type: str  # e.g. "bf16[4,32]{1,0}" or a tuple "(f32[], bf16[8]{0})"
    opcode: str
    args: str  # between the opcode's parentheses: operands, or a constant's value
    attrs: str  # everything after them
    root: bool

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)


@dataclass(frozen=True)
class Collective:
    """One collective of the compiled step."""

    kind: str  # one of KINDS
    name: str  # the HLO instruction
    bytes: int  # one execution's buffer, per device (the module's convention)
    group: int  # devices in each of its groups (1 where it names none: a permute)
    executions: int  # per step: the trip counts of the loops around it multiplied

    @property
    def received(self) -> float:
        """What a ring brings into each device, per execution: a permute's whole buffer;
        (n-1)/n of the buffer over n devices, and twice that for an all-reduce."""
        if self.kind == "collective-permute":
            return float(self.bytes)
        share = (self.group - 1) / max(self.group, 1)
        return share * self.bytes * (2 if self.kind == "all-reduce" else 1)


@dataclass(frozen=True)
class CollectiveAccount:
    """Every collective of one compiled step, with what it moves per step and device."""

    ops: tuple[Collective, ...]
    unknown_loops: int = 0  # while loops whose trip count could not be read (counted once)

    def of(self, kind: str) -> list[Collective]:
        return [op for op in self.ops if op.kind == kind]

    def bytes(self, kind: str) -> int:
        """Bytes per step and device moved by `kind` (see the module's convention)."""
        return sum(op.bytes * op.executions for op in self.of(kind))

    def executions(self, kind: str) -> int:
        return sum(op.executions for op in self.of(kind))

    def received(self, kind: str) -> int:
        """Bytes per step a ring brings into each device for `kind`."""
        return round(sum(op.received * op.executions for op in self.of(kind)))


def _bits(dtype: str) -> int:
    """An HLO element type's width: its number (bf16, s32, u4), 8 for the f8 kinds."""
    if dtype in _BITS:
        return _BITS[dtype]
    return 8 if dtype.startswith("f8") else int(re.findall(r"\d+", dtype)[0])


def array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _bits(dtype) / 8 * math.prod(int(d) for d in dims.split(",") if d)
    return math.ceil(total)


def _closing(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_instruction(line: str) -> Instruction | None:
    """The instruction on one line of a computation, or None for anything else."""
    m = re.match(r"\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if m is None:
        return None
    rest = line[m.end() :]
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")  # the result type
    op = re.match(r"\s*([\w\-]+)\(", rest[end:]) if end > 0 else None
    if op is None:
        return None
    open_at = end + op.end() - 1
    close_at = _closing(rest, open_at)
    args, attrs = rest[open_at + 1 : close_at - 1], rest[close_at:]
    return Instruction(m.group(2), rest[:end], op.group(1), args, attrs, bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str, int]:
    """The module's computations (name -> instructions), its entry's name, and how many
    devices it runs on (num_partitions x replica_count). An instruction may run over
    several lines (a Pallas kernel's custom-call carries its configuration as JSON)."""
    texts: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = texts.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line == "}":
            current = None
        elif current is not None and _STARTS.match(line):
            current.append(line)
        elif current:  # the rest of the instruction above
            current[-1] += "\n" + line
    computations = {
        name: [i for i in map(parse_instruction, lines) if i is not None]
        for name, lines in texts.items()
    }
    counts = (re.search(rf"\b{key}=(\d+)", text) for key in ("num_partitions", "replica_count"))
    return computations, entry, math.prod(int(m.group(1)) for m in counts if m)


def group_size(attrs: str, devices: int) -> int:
    """Devices per replica group: `{{0,1},{2,3}}`, iota `[2,4]<=[8]`, or a mesh's axes
    `mesh['x'=2,'y'=4] {'y'}`; all `devices` where the groups are left empty."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes.get(axis, 1) for axis in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if listed:
        return len(listed.group(1).split(","))
    return devices if "replica_groups=" in attrs else 1


def _through(name: str, where: dict[str, Instruction]) -> Instruction | None:
    """The instruction `name`, looked at through copies, bitcasts and conversions."""
    instruction = where.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert"):
        instruction = where.get(next(iter(instruction.operands), ""))
    return instruction


def _constant(name: str, where: dict[str, Instruction]) -> int | None:
    """The integer an instruction holds; None if it is no integer constant."""
    instruction = _through(name, where)
    if instruction is None or instruction.opcode != "constant":
        return None
    try:
        return int(instruction.args.strip())
    except ValueError:
        return None


def _element(name: str, where: dict[str, Instruction]) -> int | None:
    """Which element of the computation's parameter tuple an instruction is, if it is one."""
    instruction = _through(name, where)
    index = re.search(r"\bindex=(\d+)", instruction.attrs) if instruction else None
    if instruction is None or instruction.opcode != "get-tuple-element" or index is None:
        return None
    return int(index.group(1))


def _tuple_operand(instruction: Instruction | None, at: int) -> str:
    """The `at`-th operand of a `tuple` instruction ("" where there is none)."""
    if instruction is None or instruction.opcode != "tuple" or at >= len(instruction.operands):
        return ""
    return instruction.operands[at]


def _called(
    loop: Instruction, key: str, computations: dict[str, list[Instruction]]
) -> dict[str, Instruction]:
    """The instructions, by name, of the computation a `while` names as `key` (body=...)."""
    name = re.search(rf"\b{key}=%?([\w.\-]+)", loop.attrs)
    return {i.name: i for i in computations.get(name.group(1) if name else "", [])}


def trip_count(
    loop: Instruction, caller: list[Instruction], computations: dict[str, list[Instruction]]
) -> int | None:
    """How many times a `while` runs its body: XLA's known_trip_count, else read off the
    loop (`counter < N` in its condition, the counter's start in the initial tuple, its
    step `counter + s` in the body's result; start 0 and step 1 where they do not show);
    None where the condition is not such a comparison."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond, body = (_called(loop, key, computations) for key in ("condition", "body"))
    compare = next((i for i in cond.values() if i.root), None)
    direction = re.search(r"direction=(\w+)", compare.attrs) if compare else None
    if compare is None or compare.opcode != "compare" or not direction:
        return None
    if len(compare.operands) != 2:
        return None
    (counter, limit), how = compare.operands[:2], direction.group(1)
    if _constant(counter, cond) is not None:  # `N > counter` is `counter < N`
        counter, limit, how = limit, counter, _FLIP.get(how, "")
    end, at = _constant(limit, cond), _element(counter, cond)
    if end is None or at is None or how not in _COMPARE:
        return None
    here = {i.name: i for i in caller}
    start = _constant(_tuple_operand(here.get(next(iter(loop.operands), "")), at), here) or 0
    # XLA:TPU unrolls some loops (the windowed einsums' bodies run 2 steps of the ring per
    # iteration) and steps their counter by 2: without it the count would double
    step = 1
    result = next((i for i in body.values() if i.root), None)
    increment = _through(_tuple_operand(result, at), body)
    if increment is not None and increment.opcode == "add" and len(increment.operands) == 2:
        a, b = increment.operands
        for counted, constant in ((a, b), (b, a)):
            if _element(counted, body) == at and (_constant(constant, body) or 0) > 0:
                step = _constant(constant, body) or 1
    return max(0, math.ceil((end - start + _COMPARE[how]) / step))


def _kind(instruction: Instruction, computation: str) -> str | None:
    """The collective an instruction is (an async pair's `-done` half counts), or None."""
    base = re.sub(r"-done$", "", instruction.opcode)
    if base not in KINDS:
        return None
    if base == "all-reduce" and computation.startswith("all-reduce-scatter"):
        return "reduce-scatter"  # XLA:TPU's reduce-scatter (see the module's docstring)
    return base


def _callees(instruction: Instruction) -> Iterator[str]:
    if instruction.opcode in ("async-update", "async-done"):  # run by their async-start
        return
    yield from (name for _, name in _CALLS.findall(instruction.attrs))
    for _, names in _CALL_LISTS.findall(instruction.attrs):
        yield from re.findall(r"%?([\w.\-]+)", names)


def parse_collectives(text: str) -> CollectiveAccount:
    """Every collective of an HLO module's text, counted per step (see the module)."""
    computations, entry, devices = parse_module(text)
    starts: dict[str, Instruction] = {}  # async starts by name: their `-done` has no groups
    for body in computations.values():
        starts.update((i.name, i) for i in body if i.opcode.endswith("-start"))
    done: dict[str, tuple[list[Collective], int]] = {}

    def walk(name: str) -> tuple[list[Collective], int]:
        """The collectives one run of computation `name` executes, and its unknown loops."""
        if name in done:
            return done[name]
        done[name] = ([], 0)  # a cycle (none in valid HLO) ends here
        found: list[Collective] = []
        unknown = 0
        body = computations.get(name, [])
        for instruction in body:
            kind = _kind(instruction, name)
            if kind is not None and not instruction.opcode.endswith("-start"):
                start = starts.get(next(iter(instruction.operands), ""))
                groups = (start or instruction).attrs
                size = array_bytes(instruction.type)
                if kind == "reduce-scatter" and instruction.opcode.startswith("reduce-scatter"):
                    size *= group_size(groups, devices)  # its input: n times its output
                found.append(
                    Collective(kind, instruction.name, size, group_size(groups, devices), 1)
                )
            calls = [(callee, 1) for callee in _callees(instruction)]
            if instruction.opcode == "while":
                loop = re.search(r"\bbody=%?([\w.\-]+)", instruction.attrs)
                trips = trip_count(instruction, body, computations)
                unknown += trips is None
                calls += [(loop.group(1), 1 if trips is None else trips)] if loop else []
            for callee, times in calls:
                inner, inner_unknown = walk(callee)
                found += [replace(op, executions=op.executions * times) for op in inner]
                unknown += inner_unknown
        done[name] = (found, unknown)
        return done[name]

    ops, unknown = walk(entry)
    return CollectiveAccount(tuple(ops), unknown)


@dataclass(frozen=True)
class FsdpTheory:
    """What FSDP needs per step and device, in this module's convention: the parameters
    sharded over the `fsdp` axis gathered twice (forward, and again backward) and their
    gradients reduce-scattered once."""

    param_bytes: int  # those parameters, whole, in the dtype they are gathered in
    dtype: str  # that dtype (the narrower of the stored and the compute dtype)
    devices: int  # the fsdp axis's size

    def expected(self, kind: str) -> int | None:
        """Bytes per step and device FSDP moves with `kind`; None where it needs none."""
        if self.param_bytes == 0:
            return None
        return {"all-gather": 2 * self.param_bytes, "reduce-scatter": self.param_bytes}.get(kind)

    @property
    def received(self) -> int:
        """What a ring brings into each device for those: (n-1)/n of each buffer."""
        return round(3 * self.param_bytes * (self.devices - 1) / self.devices)


def fsdp_theory(params: Any, dtype: str, looked_up: Sequence[str] = ()) -> FsdpTheory:
    """FSDP's needs for abstract `params` that carry their shardings (ShapeDtypeStructs),
    computed in `dtype`. A parameter counts if its sharding names the `fsdp` mesh axis, at
    its gathered size (whole, but for the shards of its other axes: tensor parallelism),
    in the narrower of its own dtype and `dtype` (XLA casts a shard before gathering it).
    `looked_up`: top-level names of tables read by row (the token embedding): XLA gathers
    the token ids and exchanges the rows (all-to-all) instead of gathering the table."""
    total, devices, gathered = 0, 1, jnp.dtype(dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, "sharding", None)
        if getattr(path[0], "key", None) in looked_up or not isinstance(sharding, NamedSharding):
            continue
        parts = [(p,) if isinstance(p, str) else tuple(p or ()) for p in sharding.spec]
        fsdp = sharding.mesh.shape.get("fsdp", 1)
        if fsdp == 1 or not any("fsdp" in axes for axes in parts):
            continue
        devices = fsdp
        gathered = min(jnp.dtype(leaf.dtype), jnp.dtype(dtype), key=lambda d: d.itemsize)
        total += math.prod(sharding.shard_shape(leaf.shape)) * fsdp * gathered.itemsize
    return FsdpTheory(total, str(gathered), devices)
