"""The package's floors: a module imports only from its own floor or the ones below, no
module imports itself back through others, and the config loads without the modules that
build from it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "m2_pretrain"

# floor of each top-level part of m2_pretrain (a package or a module)
FLOORS = {
    "layers": 0, "checkpoint": 0, "config": 0,
    "data": 1,
    "models": 2,
    "engine": 3,
    "eval": 4, "export": 4,
    "cli": 5, "demo": 5,
}


def _part(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, m2_pretrain part)`` of every import in ``path``, function-level ones included."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if not target:  # "from . import x" at the top: x is the part
                    out += [(node.lineno, a.name) for a in node.names]
                    continue
                out.append((node.lineno, _part(target)))
            elif node.module and node.module.startswith("m2_pretrain."):
                out.append((node.lineno, _part(node.module[len("m2_pretrain."):])))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("m2_pretrain."):
                    out.append((node.lineno, _part(a.name[len("m2_pretrain."):])))
    return out


def test_every_part_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts == set(FLOORS), parts ^ set(FLOORS)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_up_a_floor(path):
    rel = path.relative_to(ROOT)
    here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if here == "__init__":
        return
    up = [(line, part) for line, part in _imports(path)
          if part in FLOORS and FLOORS[part] > FLOORS[here]]
    assert not up, f"{rel} (floor {FLOORS[here]}) imports from a higher floor: {up}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The parser resolves relative imports: an engine module importing eval is caught."""
    fake = ROOT / "engine" / "_layering_probe.py"
    src = "from ..eval.knn import knn_eval_encoder\n\ndef f():\n    from m2_pretrain.cli import main\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src)
    assert [p for _, p in _imports(fake)] == ["eval", "cli"]


def _module_imports(path: Path) -> set[str]:
    """Dotted names (relative to m2_pretrain) of the package's modules that ``path`` imports,
    function-level imports included: ``from .x import y`` counts ``x.y`` when that is a module,
    else ``x``."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("m2_pretrain"):
                target = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:
                sub = target + [a.name]
                as_module = ROOT.joinpath(*sub)
                if as_module.with_suffix(".py").is_file() or (as_module / "__init__.py").is_file():
                    out.add(".".join(sub))
                elif target:
                    out.add(".".join(target))
        elif isinstance(node, ast.Import):
            out |= {a.name[len("m2_pretrain."):] for a in node.names
                    if a.name.startswith("m2_pretrain.")}
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a list of nodes (first == last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return []


def test_no_import_cycles():
    """Between modules, package ``__init__`` files excluded as targets (a submodule importing a
    sibling loads its package first, which is not a cycle of the code)."""
    paths = sorted(ROOT.rglob("*.py"))
    packages = {_module_name(p) for p in paths if p.name == "__init__.py"}
    graph = {_module_name(p): {m for m in _module_imports(p) if m not in packages}
             for p in paths if p.name != "__init__.py"}
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    assert find_cycle({"config": {"models.build"}, "models.build": {"config"}}) == \
        ["config", "models.build", "config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_loading_a_config_imports_no_builder():
    """``load_config`` stays at the bottom floor: no model, dataset or layer module, no timm
    (torch itself comes with ``import m2_pretrain``, whose version check imports it)."""
    code = ("import sys\nfrom m2_pretrain.config import load_config\nload_config(None)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert not {m for m in loaded if m.startswith(("timm", "torchvision"))}
    assert not {m for m in loaded if m.startswith("m2_pretrain.") and m not in
                ("m2_pretrain.config",)}, sorted(m for m in loaded if m.startswith("m2_pretrain"))
