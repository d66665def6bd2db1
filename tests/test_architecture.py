"""The package's import graph, read from the source (AST, every import including those inside
functions): no cycles, and imports only run downward through the layers written in the README's
"How it works".

    cli -> demo -> serve / eval / train -> inference -> models / data -> heads / tokenizers / layout
        -> config -> utils

Packages of one layer do not import each other (eval does not import train); modules inside one
package may import each other as long as there is no cycle. Lazy imports count: a cycle hidden in
a function body still makes the code impossible to read from the bottom up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import omni

PACKAGE = Path(omni.__file__).parent
ROOT = PACKAGE.parent
LAYERS = [  # top to bottom
    ["omni.cli"],
    ["omni.demo"],
    ["omni.serve", "omni.eval", "omni.train"],
    ["omni.inference"],
    ["omni.models", "omni.data"],
    ["omni.heads", "omni.tokenizers", "omni.layout"],
    ["omni.config"],
    ["omni.utils", "omni.errors"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: set[str]) -> dict[str, set[str]]:
    """omni modules imported by `name` -> the names taken from each (empty for `import x`)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out: dict[str, set[str]] = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "omni":
                    out.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "omni":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from omni.models import checkpoint`: the submodule itself
                    out.setdefault(sub, set())
                else:
                    out.setdefault(base, set()).add(alias.name)
    return {m: names for m, names in out.items() if m != name}


def graph() -> dict[str, dict[str, set[str]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> tuple[int, str] | None:
    for i, group in enumerate(LAYERS):
        for top in group:
            if module == top or module.startswith(top + "."):
                return i, top
    return None


def test_every_module_has_a_layer():
    loose = [m for m in modules() if m != "omni" and layer_of(m) is None]
    assert not loose, f"modules outside every layer of LAYERS (add them, and to the README): {loose}"


def test_imports_run_downward():
    bad = []
    for module, deps in graph().items():
        if module == "omni":
            continue  # the public API: it re-exports (lazily) from below
        mine = layer_of(module)
        for dep, names in deps.items():
            if dep == "omni":
                if names - {"__version__"}:
                    bad.append(f"{module} imports {sorted(names)} from the package root (use their modules)")
                continue
            theirs = layer_of(dep)
            if theirs is None or mine is None:
                continue
            if theirs[0] < mine[0]:
                bad.append(f"{module} (layer {mine[1]}) imports {dep} from the higher layer {theirs[1]}")
            elif theirs[0] == mine[0] and theirs[1] != mine[1]:
                bad.append(f"{module} imports {dep} sideways ({mine[1]} and {theirs[1]} share a layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = {m: set(d) & set(modules()) for m, d in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The AST reader itself: an import inside a function, a relative import and a
    `from package import submodule` are all edges; TYPE_CHECKING imports are not."""
    src = tmp_path / "omni" / "models" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from omni.cli import main\n"
        "def f():\n    from omni.inference.generate import load\n"
        "from . import checkpoint\nfrom omni.models import backbone\n"
    )
    known = {"omni.models.checkpoint", "omni.models.backbone", "omni.inference.generate"}
    got = imports("omni.models.x", src, known)
    assert got == {"omni.inference.generate": {"load"}, "omni.models.checkpoint": set(), "omni.models.backbone": set()}


def test_readme_states_the_same_layer_order():
    readme = (ROOT / "README.md").read_text()
    line = " -> ".join(" / ".join(top.removeprefix("omni.") for top in group) for group in LAYERS)
    assert line in readme, f"README's 'How it works' should state the layer order: {line}"
