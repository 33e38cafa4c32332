"""The library's import graph runs in one direction (docs/architecture.md):

    launch -> trainer (train/loop.py) / export -> evaluate -> train engine -> tasks -> models
           -> losses -> data -> utils

Every `import` of a t3d_jax module, at module level or inside a function, is read with `ast`;
a module may import modules of its own layer or below, never above. And no project module
loads another through importlib (a hidden edge this test could not see).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "t3d_jax"

# Lowest first. A module's layer is the first prefix that matches its dotted name.
LAYERS = [
    ("utils", ("t3d_jax.utils", "t3d_jax.console")),
    ("data", ("t3d_jax.data",)),
    ("losses", ("t3d_jax.losses",)),
    ("models", ("t3d_jax.models",)),
    ("tasks", ("t3d_jax.tasks",)),
    ("train engine", ("t3d_jax.train.mesh", "t3d_jax.train.optim", "t3d_jax.train.step",
                      "t3d_jax.train.checkpoint", "t3d_jax.train.params", "t3d_jax.train.metrics",
                      "t3d_jax.train.aot", "t3d_jax.train.distributed", "t3d_jax.train.pretrained",
                      "t3d_jax.train.__init__")),
    ("evaluate", ("t3d_jax.evaluate",)),
    ("trainer / export", ("t3d_jax.train.loop", "t3d_jax.export")),
    ("package root", ("t3d_jax.__init__",)),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module}: not placed in a layer of tests/test_import_graph.py")


def project_imports(tree: ast.AST, module: str) -> set[str]:
    """Dotted names of the t3d_jax modules `tree` imports (a `from pkg import sub` names pkg.sub
    when sub is a module, else pkg)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("t3d_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t3d_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / (sub.replace(".", "/") + ".py")).is_file() or \
                    (ROOT / sub.replace(".", "/") / "__init__.py").is_file()
                out.add(sub if is_module else node.module)
    return out


def all_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts), path


def test_every_project_import_points_down_the_layers():
    upward = []
    for module, path in all_modules():
        here = layer_of(module)
        for target in project_imports(ast.parse(path.read_text()), module):
            if target in ("t3d_jax", "t3d_jax.train"):  # a package named itself: its __init__
                target += ".__init__"
            there = layer_of(target)
            if there > here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_importlib_between_project_modules():
    hidden = []
    for module, path in all_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("import_module", "spec_from_file_location", "__import__", "exec_module"):
                    hidden.append(f"{module}:{node.lineno} calls {name}")
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("source, target, ok", [
    ("t3d_jax.train.step", "t3d_jax.tasks", True),
    ("t3d_jax.evaluate.registry", "t3d_jax.train.mesh", True),
    ("t3d_jax.train.step", "t3d_jax.evaluate.registry", False),
    ("t3d_jax.data.pipeline", "t3d_jax.train.mesh", False),
])
def test_the_layer_table_itself(source, target, ok):
    assert (layer_of(target) <= layer_of(source)) == ok
