"""The floor plan of kcm_core, read from its source: every import (at module level, inside functions,
under ``TYPE_CHECKING``) as one graph, then three rules.

1. No import loops: no module reaches itself through other modules' imports.
2. No private name crosses a module boundary: ``from .x import _name`` or ``x._name`` on an imported
   kcm_core module means the boundary is drawn in the wrong place (make it public or move it).
3. Rings: the method at the root (and ``export/``) imports none of ``cli/``, ``demos/``, ``streamed/``;
   ``streamed/`` imports neither ``cli/`` nor ``demos/``; ``demos/`` does not import ``cli/``. Only
   ``cli/`` and ``demos/`` run subprocesses or open network connections (the few named exceptions
   below say why); that only they print is ``tests/test_purity.py``'s check.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kcm_core"
PACKAGE = "kcm_core"

# Loops the lead removes in another branch (PruneConfig's own module). Each entry is the set of modules
# of one loop; the test fails as soon as the loop is gone too, so the entry cannot outlive it.
KNOWN_LOOPS: list[frozenset[str]] = []

OUTER_RINGS = ("kcm_core.cli", "kcm_core.demos", "kcm_core.streamed")
# ring of the importer -> rings it may not import
FORBIDDEN = {"root": OUTER_RINGS, "kcm_core.streamed": ("kcm_core.cli", "kcm_core.demos"),
             "kcm_core.demos": ("kcm_core.cli",)}
SUBPROCESS_MODULES = {"subprocess", "multiprocessing", "pty"}
NETWORK_MODULES = {"socket", "ssl", "urllib.request", "http.client", "requests", "httpx", "urllib3", "aiohttp",
                   "ftplib", "huggingface_hub"}
# (module, imported module) -> why the root may do it
ALLOWED_OUTSIDE = {
    ("kcm_core.export.verify", "subprocess"): "save_pruned reloads every export in a fresh Python process "
                                              "(export/reload_check.py) before it is moved into place",
    ("kcm_core.hub", "huggingface_hub"): "the one short probe of a hub id the caller named (models, data)",
}


def module_name(path: Path, core: Path = CORE) -> str:
    parts = list(path.relative_to(core.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def sources(core: Path = CORE) -> dict[str, Path]:
    return {module_name(p, core): p for p in sorted(core.rglob("*.py"))}


def resolve(importer: str, importer_is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if importer_is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str, path: Path, known: set[str]):
    """(imported kcm_core module, private names taken from it, line) for every import in ``path``, and
    every other absolute module it imports as ``(module, (), line)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, is_package(path), node.level, node.module)
            symbols = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:             # a submodule: an edge of its own
                    yield f"{base}.{alias.name}", (), node.lineno
                else:
                    symbols.append(alias.name)
            if symbols or base not in known:
                private = tuple(s for s in symbols if s.startswith("_") and not s.startswith("__"))
                yield base, private, node.lineno
            for alias in node.names:                         # `from x import y` also names x.y
                if base not in known and f"{base}.{alias.name}".startswith(tuple(NETWORK_MODULES)):
                    yield f"{base}.{alias.name}", (), node.lineno


def private_attributes(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``alias._name`` where ``alias`` is a kcm_core module this file imported (``from . import demo``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(name, is_package(path), node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    aliases[alias.asname] = alias.name
    return [(f"{aliases[n.value.id]}.{n.attr}", n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def graph(core: Path = CORE) -> dict[str, set[str]]:
    files = sources(core)
    known = set(files)
    return {name: {target for target, _, _ in imports(name, path, known) if target in known and target != name}
            for name, path in files.items()}


def loops(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), each one import loop or more."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@functools.cache
def core_graph() -> dict[str, set[str]]:
    return graph()


def ring(module: str) -> str:
    if module == "kcm_core.__main__":              # `python -m kcm_core`: the command line's front door
        return "kcm_core.cli"
    return next((r for r in OUTER_RINGS if module == r or module.startswith(r + ".")), "root")


# --------------------------------------------------------------------------- the rules on kcm_core

def test_the_graph_sees_function_local_imports_and_every_folder():
    edges = core_graph()
    assert {"kcm_core.export.loading", "kcm_core.cli.commands", "kcm_core.demos.artifacts",
            "kcm_core.streamed.passes"} <= set(edges)
    # cmd_prune imports the streamed command inside a function only
    assert "kcm_core.cli.streamed" in edges["kcm_core.cli.commands"]
    assert "kcm_core.export.loading" in edges["kcm_core.models"]          # inside _load_per_layer_widths


def test_no_import_loops():
    found = loops(core_graph())
    unexpected = [sorted(c) for c in found if c not in KNOWN_LOOPS]
    assert unexpected == [], f"import loops: {unexpected}"
    gone = [sorted(k) for k in KNOWN_LOOPS if k not in found]
    assert gone == [], f"these known loops are gone: remove them from KNOWN_LOOPS: {gone}"


def test_no_private_name_is_imported_across_modules():
    files = sources()
    known = set(files)
    taken = [f"{name}:{line} takes {target}.{p}" for name, path in files.items()
             for target, private, line in imports(name, path, known) if target in known for p in private]
    taken += [f"{name}:{line} reads {attr}" for name, path in files.items()
              for attr, line in private_attributes(name, path, known)]
    assert taken == []


@pytest.mark.parametrize("importer", sorted(sources()), ids=str)
def test_rings(importer):
    forbidden = FORBIDDEN.get(ring(importer), ())
    wrong = sorted(t for t in core_graph()[importer] if ring(t) in forbidden)
    assert wrong == [], f"{importer} ({ring(importer)}) imports {wrong}"


def test_only_the_outer_rings_run_subprocesses_or_open_connections():
    files = sources()
    known = set(files)
    found = []
    for name, path in files.items():
        if ring(name) in ("kcm_core.cli", "kcm_core.demos"):
            continue
        for target, _, line in imports(name, path, known):
            top = target.split(".")[0]
            hit = top in SUBPROCESS_MODULES or any(target == m or target.startswith(m + ".") for m in NETWORK_MODULES)
            if hit and (name, top) not in ALLOWED_OUTSIDE:
                found.append(f"{name}:{line} imports {target}")
    assert found == []


def test_the_exceptions_are_still_needed():
    """Each allowed exception names an import that is really there (else it is stale: remove it)."""
    files = sources()
    known = set(files)
    present = {(name, target.split(".")[0]) for name, path in files.items()
               for target, _, _ in imports(name, path, known)}
    assert set(ALLOWED_OUTSIDE) <= present


# --------------------------------------------------------------------------- the checks can fail

def write(folder: Path, files: dict[str, str]) -> Path:
    core = folder / "kcm_core"
    for rel, text in files.items():
        (core / rel).parent.mkdir(parents=True, exist_ok=True)
        (core / rel).write_text(text)
    return core


def test_a_loop_hidden_in_a_function_is_found(tmp_path):
    core = write(tmp_path, {"__init__.py": "", "a.py": "from .b import x\n",
                            "b.py": "x = 1\ndef f():\n    from . import a\n",
                            "cli/__init__.py": "", "cli/c.py": "from .. import a\n"})
    assert loops(graph(core)) == [frozenset({"kcm_core.a", "kcm_core.b"})]


def test_a_private_import_and_a_private_attribute_are_found(tmp_path):
    core = write(tmp_path, {"__init__.py": "", "a.py": "_x = 1\n",
                            "sub/__init__.py": "",
                            "sub/b.py": "from ..a import _x\nfrom .. import a as A\ny = A._x\n"})
    files = sources(core)
    known = set(files)
    path = files["kcm_core.sub.b"]
    assert [(t, p) for t, p, _ in imports("kcm_core.sub.b", path, known) if p] == [("kcm_core.a", ("_x",))]
    assert [a for a, _ in private_attributes("kcm_core.sub.b", path, known)] == ["kcm_core.a._x"]


def test_a_root_module_reaching_into_an_outer_ring_is_found(tmp_path):
    core = write(tmp_path, {"__init__.py": "", "m.py": "def f():\n    from .demos import lm\n",
                            "demos/__init__.py": "", "demos/lm.py": "import subprocess\n"})
    edges = graph(core)
    assert edges["kcm_core.m"] == {"kcm_core.demos.lm"} and ring("kcm_core.demos.lm") == "kcm_core.demos"
    assert "kcm_core.demos" in FORBIDDEN[ring("kcm_core.m")]


def test_the_readme_code_map_names_every_module():
    """A newcomer's map: the README's code map names every module of kcm_core, each in its folder's row."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Code map"):]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}
    missing = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE)
        if path.name == "__init__.py" and len(rel.parts) > 1:
            continue                                        # a folder's row stands for its __init__
        if len(rel.parts) == 1:
            if path.name == "__main__.py":
                found = "`__main__.py`" in section
            else:
                found = path.name in rows or f"kcm_core/{path.name}" in rows
        else:
            found = f"`{path.name}`" in rows.get(f"{rel.parts[0]}/", "")
        if not found:
            missing.append(rel.as_posix())
    assert missing == []
