"""The package's shape: every module imports on its own, no import cycles, no upward imports.

`LAYERS` lists the package's parts bottom first: a module may import from its own layer and those
below, never above; the package root `engram_jax/__init__.py` re-exports public names and is
imported by no module of the package.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "engram_jax"
LAYERS = (
    ("config", "table_layout", "figures"),
    ("sharding",),
    ("data",),
    ("nn",),
    ("accounting", "interop"),
    ("train", "inference"),
    ("analysis", "experiments"),
    ("aot", "evaluate", "generate", "plot", "pretokenize"),
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(module: str) -> set[str]:
    """engram_jax modules that `module` imports anywhere in its body (functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name.split(".")[0] == "engram_jax"}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_import_names_a_module_of_the_package():
    for module, targets in GRAPH.items():
        assert targets <= set(MODULES), (module, targets - set(MODULES))


def test_no_module_imports_from_a_layer_above_or_from_the_package_root():
    for module, targets in GRAPH.items():
        if module == "engram_jax":
            continue
        for target in targets:
            assert target != "engram_jax", f"{module} imports the package root"
            assert _layer(target) <= _layer(module), (
                f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")


def test_the_import_graph_has_no_cycle():
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The checks can fail, and the graph holds imports made inside functions and of submodules
    named in `from package import module`."""
    before = dict(GRAPH)
    try:
        GRAPH["engram_jax.config.schema"] = {"engram_jax.train.loop"}
        with pytest.raises(AssertionError, match="imports engram_jax.train.loop"):
            test_no_module_imports_from_a_layer_above_or_from_the_package_root()
        # table_layout imports config.schema; the reverse edge closes a cycle within layer 0.
        GRAPH["engram_jax.config.schema"] = {"engram_jax.table_layout"}
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_the_import_graph_has_no_cycle()
    finally:
        GRAPH.clear()
        GRAPH.update(before)
    assert "engram_jax.data.shards" in GRAPH["engram_jax.data.prepare"]  # `from pkg import mod`
    assert "engram_jax.train.loop" in GRAPH["engram_jax.experiments.sweep"]  # inside a function


def test_every_module_imports_alone_in_a_fresh_process():
    """Each module is imported first, with no other module of the package loaded before it, so
    an import that only works in some order fails here."""
    script = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {sorted(MODULES)!r}:
    for loaded in [m for m in sys.modules if m == "engram_jax" or m.startswith("engram_jax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps(failed))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())
