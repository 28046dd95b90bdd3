"""The import graph of the suite's own packages, read from the source with `ast` (no import runs):
no cycle between modules, and the layers stay apart. Every import counts, at any depth, inside a
function too (a lazy import is still a dependency, and a lazy cycle is still a tangle).

    contract   the model contract; imports none of the others
    common     what serving, training, export and loadtest share (decoding, the ONNX session, atomic
               writes, core counts, scenes); imports only contract
    services   serving; imports contract and common only: no torch, nothing from training/export/loadtest
    training, export, loadtest   import contract, common and each other, never services

A pure unit test: no server, no model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "common", "services", "training", "export", "loadtest")
PRODUCERS = ("training", "export", "loadtest")  # the torch side and the clients
TORCH_FREE = ("contract", "common", "services")  # serving and what it ships with it


def module_files() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module name an import statement of this file names (absolute, relative resolved), with
    its line; `from a import b` names a.b as well as a, since b may be a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def resolve(imported: str) -> str | None:
    """The project module an imported name lands in (the longest dotted prefix that is one)."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def build_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int], dict[str, list[tuple[str, int]]]]:
    """-> (module -> project modules it imports, (importer, imported) -> a line, module -> every
    top-level package it imports, project or third-party, with the line)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    lines: dict[tuple[str, str], int] = {}
    externals: dict[str, list[tuple[str, int]]] = {name: [] for name in MODULES}
    for name, path in MODULES.items():
        for imported, line in imported_names(name, path):
            externals[name].append((imported.split(".")[0], line))
            target = resolve(imported)
            if target is not None and target != name:
                graph[name].add(target)
                lines.setdefault((name, target), line)
    return graph, lines, externals


GRAPH, LINES, EXTERNALS = build_graph()


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components]


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), closed: [a, b, ..., a]."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return sorted(component)


def describe(path: list[str]) -> str:
    return " -> ".join(f"{a} (line {LINES[a, b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def layer(module: str) -> str:
    return module.split(".")[0]


def crossings(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{a} imports {b} (line {LINES[a, b]})"
                  for a in GRAPH if layer(a) in importers
                  for b in GRAPH[a] if layer(b) in forbidden)


def test_the_graph_is_read():
    """A sanity check on the reader itself: known modules and known edges are there."""
    assert {"contract", "common.imaging", "services.service", "training.__main__", "export.onnx_export",
            "loadtest.servers"} <= set(MODULES)
    assert {"contract", "common.imaging", "services.errors"} <= GRAPH["services.tasks.images"]
    assert "services.tracing" in GRAPH["services.service"]  # from services import tracing
    assert "common.resources" in GRAPH["services.batching"]  # an import inside a method counts too
    assert "training.registry" in GRAPH["training.__main__"]


def test_no_import_cycle():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(describe(cycle) for cycle in cycles)


def test_services_import_nothing_from_training_export_or_loadtest():
    found = crossings(("services",), PRODUCERS)
    assert not found, "serving must import only contract and common:\n" + "\n".join(found)


def test_training_export_and_loadtest_import_nothing_from_services():
    found = crossings(PRODUCERS, ("services",))
    assert not found, "share through contract/ or common/, not services/:\n" + "\n".join(found)


@pytest.mark.parametrize("package", ["contract", "common"])
def test_contract_and_common_import_nothing_of_the_four(package):
    found = crossings((package,), ("services",) + PRODUCERS)
    if package == "contract":
        found += crossings((package,), ("common",))
    assert not found, f"{package} is shared by all, so it depends on none:\n" + "\n".join(found)


def test_serving_side_never_imports_torch():
    found = sorted(f"{name} imports torch (line {line})" for name, imports in EXTERNALS.items()
                   if layer(name) in TORCH_FREE for top, line in imports if top == "torch")
    assert not found, "serving and what it ships with import no torch:\n" + "\n".join(found)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# ---- no global side effects at import -------------------------------------------------------------

# Run in a fresh interpreter: first every third-party module any of ours imports (their own effects
# are not ours to judge, and are then in the baseline), then a snapshot of the process-wide state,
# then each of our modules in turn, the state compared after each, so a change names its module.
IMPORT_EFFECTS = r'''
import asyncio, importlib, json, logging, multiprocessing, os, signal, socket, sys, warnings

modules, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:  # an optional extra not installed, or not a module (a name from a package)
        pass


def snapshot():
    state = {}
    try:
        from PIL import Image
        state["PIL.Image.MAX_IMAGE_PIXELS"] = Image.MAX_IMAGE_PIXELS
    except ImportError:
        pass
    root = logging.getLogger()
    state["logging root handlers"] = [repr(h) for h in root.handlers]
    state["logging root level"] = root.level
    state["logging.disable"] = logging.root.manager.disable
    state["warnings.filters"] = [repr(f) for f in warnings.filters]
    state["os.environ"] = dict(os.environ)
    state["sys.path"] = list(sys.path)
    state["sys.excepthook"] = repr(sys.excepthook)
    state["sys.getrecursionlimit"] = sys.getrecursionlimit()
    state["socket default timeout"] = socket.getdefaulttimeout()
    handlers = {}
    for number in sorted(signal.valid_signals()):
        try:
            handlers[signal.Signals(number).name] = repr(signal.getsignal(number))
        except (ValueError, OSError):
            pass
    state["signal handlers"] = handlers
    state["asyncio event loop policy"] = type(asyncio.get_event_loop_policy()).__name__
    state["multiprocessing start method"] = multiprocessing.get_start_method(allow_none=True)
    if "numpy" in sys.modules:
        import numpy
        state["numpy.geterr"] = numpy.geterr()
    if "torch" in sys.modules:
        import torch
        state["torch threads"] = [torch.get_num_threads(), torch.get_num_interop_threads()]
        state["torch default dtype"] = str(torch.get_default_dtype())
    return state


before = snapshot()
changes, skipped = [], []
for name in modules:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in {"contract", "common", "services", "training", "export", "loadtest"}:
            raise
        skipped.append(f"{name}: needs {exc.name}")
        continue
    after = snapshot()
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            was, now = before.get(key), after.get(key)
            if isinstance(was, dict) and isinstance(now, dict):
                diff = {k: [was.get(k), now.get(k)] for k in set(was) | set(now) if was.get(k) != now.get(k)}
                changes.append(f"{name}: {key} {diff}")
            else:
                changes.append(f"{name}: {key} {was!r} -> {now!r}")
    before = after
print(json.dumps({"changes": changes, "skipped": skipped}))
'''


OPTIONAL = {"fastapi", "pyarrow"}  # pyproject's extras beyond test: bench, parquet


def third_party_imports() -> list[str]:
    """Every module name our modules import that is not ours (full dotted names, deduplicated)."""
    names = set()
    for name, path in MODULES.items():
        for imported, _ in imported_names(name, path):
            if layer(imported) not in PACKAGES and imported.split(".")[0] != "__future__":
                names.add(imported)
    return sorted(names)


def test_importing_any_module_changes_no_global_state(tmp_path):
    """Importing a module of ours leaves the process as it was: Pillow's pixel limit, logging's
    root handlers and level, warnings filters, the environment, sys.path, signal handlers, socket
    timeout, torch's threads, the event loop policy... Whatever a module needs changed is changed
    by the function that needs it (a command's main, the service's start-up), never at import."""
    import json
    import os
    import subprocess
    import sys

    # No BENTOML_HOME (a module that set it would go unseen) and no suite settings; a private HOME
    # holds BentoML's default store instead.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOML_", "SUITE_"))}
    env.update(HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="true")
    done = subprocess.run([sys.executable, "-c", IMPORT_EFFECTS, json.dumps(sorted(MODULES)),
                           json.dumps(third_party_imports())], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert not found["changes"], "import-time side effects:\n" + "\n".join(found["changes"])
    # Only a module of an optional extra may be left out (the benchmark's FastAPI reference, Parquet).
    assert all(line.split(": needs ")[1].split(".")[0] in OPTIONAL for line in found["skipped"]), found["skipped"]
