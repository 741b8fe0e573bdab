"""Module structure: no import cycle (statically, and by importing every module first in a fresh interpreter),
and no module imports another module's private (underscore) names."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "graphgrow")

# private names still imported across modules by code other refactors own (graphgrow/core, the labeling and
# fx/deepen modules); remove an entry when its import goes -- the test fails on any other
KNOWN_PRIVATE: set = set()


def _modules() -> dict:
    """module name -> (path, is_package) for every .py file under graphgrow/."""
    out = {}
    for base, dirs, files in os.walk(PKG):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(base, f), ROOT)[:-3].split(os.sep)
                pkg = rel[-1] == "__init__"
                out[".".join(rel[:-1] if pkg else rel)] = (os.path.join(base, f), pkg)
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module, is_pkg: bool, top_level_only: bool):
    """(imported module, name or None, alias, node) for the imports of ``module`` into graphgrow modules."""
    if top_level_only:
        nodes = []
        todo = list(tree.body)
        while todo:  # module level, including inside if/try blocks, not inside functions or classes
            n = todo.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            nodes.append(n)
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(n, field, []) or [])
    else:
        nodes = list(ast.walk(tree))
    for n in nodes:
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split(".")[0] == "graphgrow":
                    yield a.name, None, a.asname or a.name.split(".")[0], n
        elif isinstance(n, ast.ImportFrom):
            base = _resolve(module, is_pkg, n)
            if base.split(".")[0] != "graphgrow":
                continue
            for a in n.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    yield sub, None, a.asname or a.name, n
                else:
                    yield base, a.name, a.asname or a.name, n


def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_static_import_graph_has_no_cycle():
    graph = {}
    for mod, (path, is_pkg) in MODULES.items():
        graph[mod] = sorted({t for t, _, _, _ in _imports(mod, _parse(path), is_pkg, True) if t in MODULES and t != mod})
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
    assert "graphgrow.cli" in graph and "graphgrow.onnx.api" in graph["graphgrow.onnx"]


_FRESH = r"""
import importlib, random, sys
names = sys.argv[1:]

def torch_missing(exc):
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "torch"

def purge():
    for k in [k for k in sys.modules if k == "graphgrow" or k.startswith("graphgrow.")]:
        del sys.modules[k]

failed = []
for first in names:  # every module imported first, with no other graphgrow module loaded
    purge()
    try:
        importlib.import_module(first)
    except Exception as exc:
        if not torch_missing(exc):
            failed.append(f"{first}: {type(exc).__name__}: {exc}")
for seed in range(3):  # all modules, one after the other, in three orders
    order = list(names)
    random.Random(seed).shuffle(order)
    purge()
    for name in order:
        try:
            importlib.import_module(name)
        except Exception as exc:
            if not torch_missing(exc):
                failed.append(f"order {seed}, {name}: {type(exc).__name__}: {exc}")
print("\n".join(failed) or "OK")
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if not m.endswith(".__main__"))  # (importing __main__ runs the CLI)
    r = subprocess.run([sys.executable, "-c", _FRESH, *names], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK", r.stdout


def test_no_module_imports_private_names_of_another():
    found = set()
    for mod, (path, is_pkg) in MODULES.items():
        tree = _parse(path)
        aliases = {}
        for target, name, alias, _ in _imports(mod, tree, is_pkg, False):
            if name is None:
                aliases[alias] = target
            elif _private(name) and target != mod:
                found.add((mod, target, name))
        for n in ast.walk(tree):  # module._name through an alias bound to a graphgrow module
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases \
                    and _private(n.attr) and aliases[n.value.id] != mod:
                found.add((mod, aliases[n.value.id], n.attr))
    assert found <= KNOWN_PRIVATE, sorted(found - KNOWN_PRIVATE)


def _all_imports(mod: str) -> set:
    """Every module ``mod`` imports, anywhere in it (module level or inside a function): graphgrow modules by
    their full name, third-party ones by their top-level package."""
    path, is_pkg = MODULES[mod]
    tree = _parse(path)
    out = {t for t, _, _, _ in _imports(mod, tree, is_pkg, False)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
            out.add(n.module.split(".")[0])
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# (package whose modules are checked, packages they must never import): one core, thin frontends
LAYERS = [
    ("graphgrow.core", ["torch", "onnx", "onnxruntime", "graphgrow.fx", "graphgrow.hf", "graphgrow.onnx",
                        "graphgrow.api", "graphgrow.verify"]),
    ("graphgrow.onnx", ["torch", "graphgrow.fx", "graphgrow.hf", "graphgrow.api", "graphgrow.verify"]),
    ("graphgrow.fx", ["graphgrow.hf", "graphgrow.api"]),
    ("graphgrow.hf", ["graphgrow.api"]),
]


def test_layers_import_only_downwards():
    found = []
    for package, banned in LAYERS:
        for mod in MODULES:
            if _under(mod, package):
                found += [f"{mod} imports {t}" for t in sorted(_all_imports(mod))
                          if any(_under(t, b) for b in banned)]
    assert not found, "; ".join(found)


def test_block_copy_walk_is_written_once():
    """The residual-branch walk (post-norm refusal, residual terms, branch zeroing) lives in graphgrow.core;
    the frontends only read their nodes for it."""
    for mod in MODULES:
        with open(MODULES[mod][0]) as f:
            text = f.read()
        if mod != "graphgrow.core.branches":
            assert "a post-norm block" not in text, mod
            assert "def _zero_targets" not in text and "def _residual_terms" not in text, mod
