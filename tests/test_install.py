"""The package's install metadata: ranges, not pins; every imported package declared; a resolver
dry run that keeps an existing supported torch; one clear line at import for an unsupported
torch or a Detectron2 that does not import."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import m2_pretrain

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST_OF_IMPORT = {"cv2": "opencv-python", "PIL": "Pillow", "yaml": "PyYAML"}
# installed by scripts/install_detectron2.sh (not on PyPI by its authors)
NOT_ON_PYPI = {"detectron2"}


def _requirements(reqs: list[str]) -> dict[str, str]:
    """``{lower-cased name: specifier}`` of requirement strings such as ``"torch>=2.13"``."""
    out = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", r)
        out[m.group(1).lower()] = m.group(2).strip()
    return out


def test_metadata_declares_ranges_not_pins():
    assert PROJECT["requires-python"] == ">=3.11"
    deps = _requirements(PROJECT["dependencies"])
    pinned = {n: s for n, s in deps.items() if "==" in s}
    assert not pinned, f"exact pins belong in requirements/*.txt: {pinned}"
    assert all(s.startswith(">=") for s in deps.values()), deps
    assert deps["torch"] == ">=" + ".".join(map(str, m2_pretrain.TORCH_MIN))
    assert deps["torchvision"] == ">=0.28"  # torchvision 0.28 pairs with torch 2.13


def _third_party_imports(root: Path) -> dict[str, str]:
    """``{top-level module: first file importing it}`` over a package, function-level imports
    included, without the standard library and the project's own packages."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name == "torch.utils.tensorboard" or name.startswith("torch.utils.tensorboard."):
                    name = "tensorboard"  # torch's writer needs the tensorboard package
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("m2_pretrain", "m2_detectron2"):
                    continue
                found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    declared = set(_requirements(PROJECT["dependencies"]))
    imported = {**_third_party_imports(REPO / "m2_detectron2"),
                **_third_party_imports(REPO / "m2_pretrain")}
    assert {"cv2", "safetensors", "tensorboard", "torch", "numpy"} <= set(imported)
    missing = {f"{DIST_OF_IMPORT.get(m, m)} ({where})" for m, where in imported.items()
               if m not in NOT_ON_PYPI and DIST_OF_IMPORT.get(m, m).lower() not in declared}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {sorted(missing)}"


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """The metadata of an installed distribution (all that pip's resolver reads of it)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _dry_run(tmp_path: Path, torch_version: str, vision_version: str):
    """``pip install --dry-run --report -e <project>`` in this interpreter's environment with
    torch and torchvision of the given versions installed (their metadata shadowing the real
    ones through PYTHONPATH); offline: no index, no configuration files, no find-links."""
    site = tmp_path / f"site-{torch_version}"
    _fake_dist(site, "torch", torch_version)
    _fake_dist(site, "torchvision", vision_version, (f"torch=={torch_version}",))
    project = tmp_path / "project"  # the metadata build writes an egg-info next to pyproject
    project.mkdir(exist_ok=True)
    shutil.copy(REPO / "pyproject.toml", project)
    shutil.copy(REPO / "README.md", project)
    for pkg in ("m2_pretrain", "m2_detectron2"):
        (project / pkg).mkdir(exist_ok=True)
        (project / pkg / "__init__.py").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONPATH=str(site), PIP_NO_INPUT="1")
    report = tmp_path / f"report-{torch_version}.json"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report),
         "--no-index", "--no-build-isolation", "--disable-pip-version-check", "-e",
         str(project)], env=env, capture_output=True, text=True, timeout=300)
    installs = None
    if r.returncode == 0:
        installs = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]}
    return r, installs


def test_pip_install_keeps_an_existing_supported_torch(tmp_path):
    """The README's `pip install -e .` into an environment holding torch 2.13.0 (supported,
    not the pinned 2.14.1) installs this package only; a torch below the range is not kept."""
    r, installs = _dry_run(tmp_path, "2.13.0+cu126", "0.28.0+cu126")
    assert r.returncode == 0, r.stderr[-2000:]
    assert installs == {"m2-teacher": m2_pretrain.__version__}, installs
    # the same dry run with torch 2.12 installed wants another torch (none offline: it fails)
    r, installs = _dry_run(tmp_path, "2.12.1", "0.27.1")
    assert r.returncode != 0 and installs is None
    assert re.search(r"No matching distribution found for torch(vision)?>=", r.stderr), r.stderr


def _run(code: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def _last_line(r: subprocess.CompletedProcess) -> str:
    return r.stderr.strip().splitlines()[-1]


def test_unsupported_torch_is_named_at_import():
    code = """
import sys, torch
for pkg, version in [("m2_pretrain", "2.12.1+cu126"), ("m2_detectron2", "2.12.1"),
                     ("m2_pretrain", "2.13.0+cpu")]:
    torch.__version__ = version
    for m in [m for m in sys.modules if m.startswith(("m2_pretrain", "m2_detectron2"))]:
        del sys.modules[m]
    try:
        __import__(pkg)
        print("imported")
    except ImportError as e:
        print(f"ImportError: {e}")
"""
    r = _run(code, [REPO])
    assert r.returncode == 0, r.stderr
    below, below_d2, supported = r.stdout.strip().splitlines()
    assert below.startswith(
        "ImportError: m2_pretrain supports torch >= 2.13; found torch 2.12.1+cu126 (")
    assert below.endswith("): install a torch in that range (docs/install.md)")
    assert below_d2.startswith(
        "ImportError: m2_pretrain supports torch >= 2.13; found torch 2.12.1 (")
    assert supported == "imported"


def _fake_detectron2(root: Path, body: str, version: str) -> Path:
    (root / "detectron2").mkdir(parents=True)
    (root / "detectron2" / "__init__.py").write_text(body)
    _fake_dist(root, "detectron2", version)
    return root


def test_detectron2_that_does_not_import_is_named_at_import(tmp_path):
    broken = _fake_detectron2(
        tmp_path / "broken", "raise ImportError('libc10.so: cannot open shared object file')\n",
        "0.6")
    r = _run("import m2_detectron2", [broken, REPO])
    assert r.returncode != 0
    assert _last_line(r) == (
        "ImportError: m2_detectron2 needs Detectron2 >= 0.6 (the v0.6 release or upstream "
        "main); found detectron2 0.6, which does not import (ImportError: libc10.so: cannot "
        "open shared object file): install one with scripts/install_detectron2.sh "
        "(docs/install.md)")
    old = _fake_detectron2(tmp_path / "old", "__version__ = '0.5'\n", "0.5")
    r = _run("import m2_detectron2", [old, REPO])
    assert r.returncode != 0
    assert _last_line(r).startswith("ImportError: m2_detectron2 needs Detectron2 >= 0.6 (the "
                                    "v0.6 release or upstream main); found detectron2 0.5 (")
