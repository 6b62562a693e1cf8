"""Detectron2 plugin for Momentum² Teacher transfer (the only package importing detectron2).

Importing it installs a pure-Python stand-in for ``detectron2._C`` when detectron2 was
installed without its C++ extension, so that ``import detectron2.modeling`` works.
"""

from ._c_standin import MissingCppOpError, install_c_standin, is_standin_active

HAS_CPP_OPS = not install_c_standin()

__all__ = ["HAS_CPP_OPS", "MissingCppOpError", "install_c_standin", "is_standin_active"]
