"""The house rules that keep the package easy to change: imports only point down the layers (docs/ARCHITECTURE.md),
the package face only re-exports, and files and functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "behemoth"
# bottom to top; a module may import its own layer and those below, never one above
LAYERS = (
    ("config", "config_io", "fsutil", "ranks", "progress", "runlog", "version", "machine"),
    ("data", "model"),
    ("checkpoint",),
    ("inference", "parallel"),
    ("train",),
    ("eval",),
    ("demo", "plan", "roofline", "info"),
    ("cli", "commands", "__main__"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 60


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).with_suffix("")
        if rel.parts != ("__init__",):
            yield f, rel.parts


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every `behemoth...` module imported, anywhere in the file (function bodies too), with its line."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "behemoth"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "behemoth":
            if node.module == "behemoth":  # `from behemoth import x`: a submodule, or a name of the face
                out += [(f"behemoth.{a.name}" if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                         else "behemoth", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
    return out


def test_every_module_has_a_layer():
    missing = sorted({parts[0] for _, parts in _modules()} - set(LAYER))
    assert not missing, f"add these to LAYERS (and docs/ARCHITECTURE.md): {missing}"


def test_no_import_runs_up_the_layers_or_through_the_package_face():
    wrong = []
    for f, parts in _modules():
        for name, line in _imports(ast.parse(f.read_text())):
            target = name.split(".")
            if target == ["behemoth"]:
                wrong.append(f"{f.relative_to(SRC)}:{line} imports the package face (import from its module)")
            elif LAYER[target[1]] > LAYER[parts[0]]:
                wrong.append(f"{f.relative_to(SRC)}:{line} ({parts[0]}) imports {name} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_the_package_face_only_re_exports():
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        all_list = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
        assert isinstance(node, ast.Import | ast.ImportFrom) or docstring or all_list, ast.unparse(node)


@pytest.mark.parametrize("path", [f for f, _ in _modules()], ids=lambda f: str(f.relative_to(SRC)))
def test_files_and_functions_stay_short(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path.name}: {text.count(chr(10))} lines"
    functions = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in functions
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {long}"
