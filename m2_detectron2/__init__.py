"""Detectron2 plugin for Momentum² Teacher transfer (the only package importing detectron2).

Importing it checks that Detectron2 imports and lies in the supported range (one
``ImportError`` line naming the version found), then installs a pure-Python stand-in for
``detectron2._C`` when detectron2 was installed without its C++ extension, so that
``import detectron2.modeling`` works.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from m2_pretrain import release_tuple  # also checks the torch version

# Tested: the v0.6 release (its PyPI copy) and upstream main at 02b5c4e, which also calls
# itself 0.6 (docs/install.md, "Tested combinations").
DETECTRON2_MIN = (0, 6)
_SUPPORTED = "Detectron2 >= 0.6 (the v0.6 release or upstream main)"
_HOW = "install one with scripts/install_detectron2.sh (docs/install.md)"


def _installed_detectron2() -> str:
    """``"<distribution> <version>"`` of the installed Detectron2 (from its metadata)."""
    for dist in ("detectron2", "pb1-detectron2"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "no detectron2 distribution"


def _check_detectron2() -> None:
    try:
        import detectron2

        if importlib.util.find_spec("detectron2._C") is not None:  # a build with C++ ops
            import detectron2._C  # noqa: F401 - fails when built for another torch
    except Exception as e:  # noqa: BLE001 - any failure means "this Detectron2 is unusable"
        first = (str(e).strip().splitlines() or [""])[0]
        raise ImportError(f"m2_detectron2 needs {_SUPPORTED}; found {_installed_detectron2()}, "
                          f"which does not import ({type(e).__name__}: {first}): "
                          f"{_HOW}") from None
    found = str(getattr(detectron2, "__version__", "unknown"))
    if release_tuple(found)[:2] < DETECTRON2_MIN:
        raise ImportError(f"m2_detectron2 needs {_SUPPORTED}; found detectron2 {found} "
                          f"({detectron2.__file__}): {_HOW}")


_check_detectron2()

from ._c_standin import MissingCppOpError, install_c_standin, is_standin_active  # noqa: E402

HAS_CPP_OPS = not install_c_standin()

__all__ = ["HAS_CPP_OPS", "MissingCppOpError", "install_c_standin", "is_standin_active"]
