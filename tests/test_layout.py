"""The package layout: one folder per concern, and imports that flow one way.

The rules (also in ``jaxsd/__init__.py``), read off every ``import`` statement with ``ast``,
including the ones inside functions:

    models/       imports nothing else of jaxsd
    checkpoints/  imports only models/
    sampling/     imports nothing else of jaxsd (it sees the denoiser as a model_fn)
    adapters/     imports only checkpoints/ and models/ (LoRA files, embeddings)
    runtime.py    imports nothing else of jaxsd (the compilation cache, devices)
    pipelines/    composes models/, checkpoints/, sampling/, adapters/ and runtime.py
    training/     may use all of the above; outside training/, only cli.py imports it
    cli.py        the only module that imports both pipelines/ and training/ (batch.py, the
                  prompts file of `jaxsd generate --prompts`, belongs to it)

and no module imports itself back through a chain of others. ``python tests/test_layout.py``
prints every module with the jaxsd modules it imports.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxsd"
CONCERNS = ("models", "checkpoints", "sampling", "adapters", "runtime", "pipelines", "training")
# concern -> the concerns its modules may import (their own included)
ALLOWED = {
    "models": {"models"},
    "checkpoints": {"checkpoints", "models"},
    "sampling": {"sampling"},
    "adapters": {"adapters", "checkpoints", "models"},
    "runtime": {"runtime"},
    "pipelines": {"pipelines", "models", "checkpoints", "sampling", "adapters", "runtime"},
    "training": {"training", "models", "checkpoints", "sampling", "adapters", "runtime", "pipelines"},
    "jaxsd": {"models", "checkpoints", "sampling", "pipelines", "runtime"},    # the public API
    "cli": {"jaxsd", "cli", *CONCERNS},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def jaxsd_imports(path: Path) -> set[str]:
    """The jaxsd modules that ``path`` imports, anywhere in the file."""
    name, found = module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "jaxsd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "jaxsd":
                continue
            for alias in node.names:   # `from jaxsd.sampling import loop` imports a module
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return found - {name}


def concern(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "jaxsd"
    if parts[1] in ("cli", "__main__", "batch"):
        return "cli"
    return parts[1] if parts[1] in CONCERNS else name


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): jaxsd_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_concern():
    for name in import_graph():
        assert concern(name) in ALLOWED, f"{name} sits outside the folders {CONCERNS} and cli.py"


def test_imports_flow_one_way():
    broken = []
    for name, imports in import_graph().items():
        for target in sorted(imports):
            if concern(target) not in ALLOWED[concern(name)]:
                broken.append(f"{name} imports {target} ({concern(name)}/ may import only "
                              f"{sorted(ALLOWED[concern(name)])})")
    assert not broken, "\n".join(broken)


def test_only_the_cli_imports_training_from_outside():
    graph = import_graph()
    importers = {n for n, imps in graph.items()
                 if concern(n) != "training" and any(concern(t) == "training" for t in imps)}
    assert importers == {"jaxsd.cli"}
    both = {n for n, imps in graph.items() if concern(n) != "training"
            and {"pipelines", "training"} <= {concern(t) for t in imps}}
    assert both <= {"jaxsd.cli"}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rules_catch_a_wrong_import():
    """The checker itself: a models/ module importing checkpoints/ is reported."""
    bad = PACKAGE / "models" / "_layout_probe.py"
    assert not bad.exists()
    try:
        bad.write_text("from jaxsd.checkpoints import convert\n\ndef f():\n    import jaxsd.training.loop\n")
        imports = jaxsd_imports(bad)
        assert imports == {"jaxsd.checkpoints.convert", "jaxsd.training.loop"}
        assert {concern(t) for t in imports} - ALLOWED["models"] == {"checkpoints", "training"}
    finally:
        bad.unlink()


def test_import_jaxsd_loads_neither_training_nor_optax():
    code = ("import sys, jaxsd; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('optax', 'torch', 'diffusers') or m.startswith(('jaxsd.training', 'jaxsd.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":
    for name, imports in import_graph().items():
        print(f"{name:40s} {concern(name):12s} {', '.join(sorted(imports)) or '-'}")
