"""The package's floors: a module imports only from its own floor or the ones below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "m2_pretrain"

# floor of each top-level part of m2_pretrain (a package or a module)
FLOORS = {
    "layers": 0, "checkpoint": 0,
    "config": 1, "data": 1, "models": 1,
    "engine": 2,
    "eval": 3, "export": 3,
    "cli": 4, "demo": 4,
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
