"""Momentum² Teacher self-supervised pretraining on timm encoders.

Importing the package checks that the installed torch lies in the supported range (one
``ImportError`` line naming the version found), before any module uses it.
"""

from __future__ import annotations

import re

__version__ = "0.1.0"

# The oldest torch the test suite runs against (docs/install.md, "Tested combinations"); the
# same bound as ``torch>=2.13`` in pyproject.toml (tests/test_install.py checks they agree).
TORCH_MIN = (2, 13)


def release_tuple(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.13.0+cu130"`` -> ``(2, 13, 0)``;
    ``()`` when it does not start with a number."""
    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _check_torch() -> None:
    supported = f"torch >= {'.'.join(map(str, TORCH_MIN))}"
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"m2_pretrain needs {supported}, and torch does not import ({e}); "
                          "see docs/install.md") from None
    found = str(torch.__version__)
    if release_tuple(found)[:2] < TORCH_MIN:
        raise ImportError(f"m2_pretrain supports {supported}; found torch {found} "
                          f"({torch.__file__}): install a torch in that range "
                          "(docs/install.md)")


_check_torch()
