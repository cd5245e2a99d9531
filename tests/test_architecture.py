"""The tree keeps its architecture (docs/architecture.md): no import cycle among etrm/, diagnostics/ and dashboards/
(every import statement counts: module level, inside functions, under ``if TYPE_CHECKING:``, relative ones), no module
over 550 lines, and every module under diagnostics/ listed in its part of docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etrm", "diagnostics", "dashboards")
MAX_LINES = 550
DOC = ROOT / "docs" / "architecture.md"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its ``__init__.py``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that the file's import statements name, wherever they stand in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        out.update(t for t in map(nearest, targets) if t is not None and t != name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import cycle lies in
    one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # iterative, so deep chains do not hit the recursion limit
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def doc_parts(text: str) -> dict[str, set[str]]:
    """The part table of docs/architecture.md: each row whose first cell names a ``diagnostics`` folder, with the
    modules its second cell lists (backticked names)."""
    parts: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) < 2:
            continue
        folder = re.match(r"`(diagnostics/(?:[a-z_]+/)?)`", cells[0])
        if folder:
            parts[folder.group(1)] = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[1]))
    return parts


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # the graph is real: a few imports it must see, of each kind
    assert "diagnostics.events" in graph["diagnostics.session"]  # module level
    assert "etrm.data.arc" in graph["etrm.data.build"]  # inside a function
    assert "diagnostics.properties.adapter" in graph["diagnostics.adapter"]  # `from pkg import submodule`
    assert not any(m.startswith("etrm") for d in (graph[k] for k in graph if k.startswith("diagnostics")) for m in d)
    # the four public alias modules import their homes, and nothing imports them back: no cycle
    found = cycles(graph)
    assert found == [], "import cycles (each group imports itself round): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_sees_every_kind_of_import(tmp_path):
    """A cycle closed only by a TYPE_CHECKING import, a function-level import or a relative import is found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "etrm" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from etrm.b import B\n")
    (tmp_path / "etrm" / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "etrm" / "c.py").write_text("import etrm.d\n")
    (tmp_path / "etrm" / "d.py").write_text("from .c import x\n")
    (tmp_path / "etrm" / "e.py").write_text("from etrm import d\n")
    assert cycles(import_graph(tmp_path)) == [["etrm.a", "etrm.b"], ["etrm.c", "etrm.d"]]


def test_no_module_is_over_550_lines():
    over = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert over == {}, f"modules over {MAX_LINES} lines (split them along their seams): {over}"


def test_every_diagnostics_module_is_in_its_part_of_the_architecture_doc():
    parts = doc_parts(DOC.read_text())
    assert {"diagnostics/", "diagnostics/trace/", "diagnostics/probes/", "diagnostics/doctor/",
            "diagnostics/properties/"} <= set(parts)
    tree: dict[str, set[str]] = {}
    for path in (ROOT / "diagnostics").rglob("*.py"):
        if path.name != "__init__.py":
            tree.setdefault(path.parent.relative_to(ROOT).as_posix() + "/", set()).add(path.stem)
    missing = {part: sorted(mods - parts.get(part, set())) for part, mods in tree.items()
               if mods - parts.get(part, set())}
    stale = {part: sorted(mods - tree.get(part, set())) for part, mods in parts.items() if mods - tree.get(part, set())}
    assert missing == {}, f"modules no part of docs/architecture.md lists (add them to their part's row): {missing}"
    assert stale == {}, f"docs/architecture.md lists modules that do not exist: {stale}"
