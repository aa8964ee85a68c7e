"""The house rules that keep the code readable: rooms by concept with allowed arrows
between them (docs/architecture.md), few modules loose in nnxtrain/, small files and
classes, no import cycles.

Issue 12 split a 416-line Trainer that imported the plugin API in a circle; issue 22 moved
30 flat modules into rooms. These checks keep both. They read the source with `ast`, so they
cover every module of nnxtrain/ and plugins/, imported or not.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"nnxtrain": ROOT / "nnxtrain", "nnxtrain.plugins": ROOT / "plugins"}
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 250
# Modules directly in nnxtrain/ (the public API, its `hf` name and the leaves); a new
# concept gets a room, a module that outgrows its file is split inside its room.
MAX_TOP_LEVEL = 6
LEAVES = {"nnxtrain.errors", "nnxtrain.units", "nnxtrain.jsonio"}
API = {"nnxtrain", "nnxtrain.hf"}  # re-exports only
# Which rooms each room may import (its own always). docs/architecture.md draws the same.
ARROWS: dict[str, set[str]] = {
    "leaves": set(),
    "config": {"leaves"},
    "parallel": {"config", "leaves"},
    "model": {"config", "parallel", "leaves"},
    "data": {"config", "leaves"},
    "run": {"config", "leaves"},
    "checkpoint": {"config", "model", "parallel", "leaves"},
    "interop": {"config", "model", "parallel", "checkpoint", "leaves"},
    "prefs": {"config", "model", "leaves"},
    "train": {
        "config",
        "model",
        "data",
        "parallel",
        "run",
        "checkpoint",
        "interop",
        "prefs",
        "leaves",
    },
    "cli": {
        "api",
        "config",
        "model",
        "data",
        "parallel",
        "run",
        "checkpoint",
        "interop",
        "prefs",
        "train",
        "leaves",
    },
    "api": {
        "config",
        "model",
        "data",
        "parallel",
        "run",
        "checkpoint",
        "interop",
        "prefs",
        "train",
        "leaves",
    },
    # Plugins use the public API alone, as a user's plugin would: `nnxtrain` and its public
    # packages (the checkpoint format), and their own private helpers.
    "plugins": {"api", "checkpoint"},
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package and its top-level plugins/ folder."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The nnxtrain modules `name` imports, TYPE_CHECKING imports included (a cycle there
    still couples the modules)."""
    tree, out = ast.parse(path.read_text()), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            # `from pkg import mod` imports the module; `from mod import name`, the module
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    found = modules()
    # A package's __init__ re-exports its submodules; the edges that matter run between
    # the modules themselves, so the package roots are left out.
    graph = {
        name: {m for m in imports(name, path, set(found)) if m not in PACKAGES}
        for name, path in found.items()
        if name not in PACKAGES
    }
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_and_classes_stay_small(name):
    path = modules()[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path} is over {MAX_FILE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{path}: class {node.name} has {length} lines"


def room(module: str) -> str:
    """The room a module lives in (the leaves and the public API are rooms of their own)."""
    if module.startswith("nnxtrain.plugins"):
        return "plugins"
    if module in LEAVES or module in API:
        return "leaves" if module in LEAVES else "api"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (ROOT / "nnxtrain" / parts[1]).is_dir() else module


def room_arrows() -> dict[tuple[str, str], set[str]]:
    """(room, room it imports) -> the module imports behind that arrow."""
    found, arrows = modules(), {}
    for name, path in found.items():
        for target in imports(name, path, set(found)):
            if room(name) != room(target):
                arrows.setdefault((room(name), room(target)), set()).add(f"{name} -> {target}")
    return arrows


def test_every_module_lives_in_a_known_room():
    stray = sorted(m for m in modules() if room(m) not in ARROWS)
    assert not stray, f"modules outside any room (add them to a room of nnxtrain/): {stray}"


def test_rooms_import_only_along_the_allowed_arrows():
    bad = {
        f"{a} -> {b}": sorted(why)
        for (a, b), why in room_arrows().items()
        if b not in ARROWS.get(a, set())
    }
    assert not bad, f"imports against docs/architecture.md's arrows: {bad}"


def test_the_arrow_check_catches_a_wrong_arrow(tmp_path):
    """A model module that imports the training loop is reported (the check can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from nnxtrain.train.trainer import Trainer\n")
    targets = imports("nnxtrain.model.bad", bad, set(modules()))
    assert targets == {"nnxtrain.train.trainer"}
    assert room("nnxtrain.train.trainer") not in ARROWS[room("nnxtrain.model.bad")]


def test_few_modules_lie_loose_in_the_package():
    loose = sorted(p.name for p in (ROOT / "nnxtrain").glob("*.py"))
    assert len(loose) <= MAX_TOP_LEVEL, f"{len(loose)} modules directly in nnxtrain/: {loose}"
    names = {f"nnxtrain.{n[:-3]}" for n in loose if n != "__init__.py"}
    assert names <= LEAVES | API, f"not a leaf nor the public API: {sorted(names - LEAVES - API)}"


@pytest.mark.parametrize("module", sorted(LEAVES))
def test_leaves_import_nothing_of_ours(module):
    path = modules()[module]
    assert not imports(module, path, set(modules())), f"{module} imports nnxtrain modules"


def test_checkpoint_format_has_one_owner():
    """Orbax is imported in the checkpoint room alone: the format on disk has one owner."""
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "orbax" for n in names) and room(name) != "checkpoint":
                users.append(name)
    assert not users, f"Orbax imported outside nnxtrain/checkpoint/: {sorted(set(users))}"
