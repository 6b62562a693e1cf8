"""Pickled weights without running code, readable by numpy 1 and numpy 2.

Detectron2 reads ``.pkl`` weights with a plain ``pickle.load``, and unpickling can call any
importable function (a ``__reduce__`` that calls ``os.system`` runs before anything fails).
:func:`load_pickle` is a restricted unpickler: plain containers, strings, numbers, and numpy
arrays, dtypes and scalars; anything else is refused with a one-line :class:`UnsafePickleError`
naming the file and the object. :func:`load_torch_file` is the same for PyTorch files
(``torch.load(weights_only=True)``, with errors on one line). Detectron2's checkpointer reads
every format through them (:class:`m2_detectron2.checkpoint.RestrictedCheckpointer`).

numpy 2 pickles arrays through ``numpy._core.multiarray``, numpy 1 through
``numpy.core.multiarray``; each numpy lacks (or only shims) the other's path. On load, both
spellings resolve to whichever this numpy has. :func:`dump_pickle` writes arrays as
``numpy.ndarray(shape, dtype_string, bytearray)``, which references only ``numpy.ndarray``
and ``bytearray``: present under both numpy versions, so even Detectron2's plain unpickler
reads the files in either environment.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

# Globals a weights pickle may reference. numpy's private modules are listed once, under
# their numpy-1 name; "numpy._core" is mapped onto it.
_ALLOWED = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("builtins", "complex"), ("builtins", "slice"), ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
}
_NUMPY_PRIVATE = ("numpy.core", "numpy._core")


class UnsafePickleError(ValueError):
    """A ``.pkl`` file that is not plain weights (or not a pickle); one line naming the file."""


def _canonical(module: str) -> str:
    for prefix in _NUMPY_PRIVATE:
        if module == prefix or module.startswith(prefix + "."):
            return "numpy.core" + module[len(prefix):]
    if module == "__builtin__":  # Python 2 pickles (Caffe2 / Detectron model zoo)
        return "builtins"
    return module


def _import_numpy_private(canonical: str):
    """``numpy.core.X`` from this numpy: ``numpy._core.X`` on numpy 2, ``numpy.core.X`` on 1."""
    tail = canonical[len("numpy.core"):]
    last_error: Exception | None = None
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(prefix + tail)
        except ImportError as e:
            last_error = e
    raise last_error  # type: ignore[misc]


def _sized_only(kind: type, source: str):
    """``kind`` (set, frozenset, bytearray) built only from data already in the pickle: a
    ``range`` or a bare size would make a few bytes expand into gigabytes."""

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (list, tuple, bytes, bytearray, str, set,
                                             frozenset)):
            raise UnsafePickleError(f"{source}: refusing {kind.__name__}() of a "
                                    f"{type(args[0]).__name__} (not plain weights)")
        return kind(*args)

    return build


_GUARDED = {("builtins", k.__name__): (lambda source, k=k: _sized_only(k, source))
            for k in (set, frozenset, bytearray)}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (_canonical(module), name)
        if key not in _ALLOWED:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle {module}.{name} (a weights .pkl may hold "
                "only containers, strings, numbers and numpy arrays; loading other objects can "
                "run code)")
        if key in _GUARDED:
            return _GUARDED[key](self.source)
        if key[0].startswith("numpy.core"):
            return getattr(_import_numpy_private(key[0]), name)
        return getattr(importlib.import_module(key[0]), name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: not a plain pickle (it uses persistent ids, as "
                                "torch.save files do)")


def _check_no_object_arrays(obj: Any, source: str, max_depth: int = 64) -> None:
    """Refuse object arrays anywhere in ``obj``, visiting each container once.

    A pickle can reference one object many times (its memo), so a few hundred bytes can
    describe a graph with exponentially many paths; walking paths would hang. Objects are
    visited once by ``id``, which keeps the walk linear in the pickle's size.
    """
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > max_depth:
            raise UnsafePickleError(f"{source}: nested too deeply for a weights file")
        if isinstance(node, np.ndarray):
            if node.dtype.hasobject:
                raise UnsafePickleError(f"{source}: holds an object array, not plain weights")
        elif isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in node)


def load_pickle_file(f: BinaryIO, source: str | None = None) -> Any:
    """Restricted unpickling of an open binary file (see :func:`load_pickle`)."""
    source = source or str(getattr(f, "name", "<pickle>"))
    try:
        obj = _RestrictedUnpickler(f, source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsafePickleError(f"{source}: not a readable weights pickle ({first})") from None
    _check_no_object_arrays(obj, source)
    return obj


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only plain containers, strings, numbers and numpy arrays,
    dtypes and scalars (numpy-1 and numpy-2 module paths alike).

    Raises:
        UnsafePickleError: the file references anything else, holds object arrays, or is not
            a readable pickle; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnsafePickleError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        return load_pickle_file(f, str(path))


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, on CPU.

    ``weights_only=True`` is passed explicitly, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    cannot override (it only changes the default).

    Raises:
        UnsafePickleError: the file is missing, references other objects, or is not a
            PyTorch file; one line naming the file.
    """
    from m2_pretrain.checkpoint import refusal_reason, torch_load_restricted

    path = Path(path)
    if path.is_dir():
        raise UnsafePickleError(f"{path} is a directory, not a weights file")
    if not path.is_file():
        raise UnsafePickleError(f"weights file not found: {path}")
    try:
        return torch_load_restricted(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable weights"
        raise UnsafePickleError(f"{path}: refused by the restricted loader of PyTorch files "
                                f"({refusal_reason(e)})") from None


class _PortablePickler(pickle.Pickler):
    """Writes numpy arrays (and numpy scalars, as 0-d arrays) as
    ``numpy.ndarray(shape, dtype_string, bytearray)``: no numpy-private module in the file."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (np.ndarray, np.generic)):
            a = np.asarray(obj)  # tobytes() below is C order whatever the strides
            if a.dtype.hasobject:
                raise TypeError("object arrays cannot be written as plain weights")
            return np.ndarray, (a.shape, a.dtype.str, bytearray(a.tobytes()))
        return NotImplemented


def dump_pickle(obj: Any, f: BinaryIO) -> None:
    """Pickle ``obj`` (containers of numpy arrays, strings, numbers) so that numpy 1 and numpy 2
    read it with a plain ``pickle.load`` as well as with :func:`load_pickle`."""
    _PortablePickler(f, protocol=4).dump(obj)


def dumps_pickle(obj: Any) -> bytes:
    """:func:`dump_pickle` into bytes."""
    buf = io.BytesIO()
    dump_pickle(obj, buf)
    return buf.getvalue()


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside Detectron2's checkpoint module."""

    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: BinaryIO, **kwargs: Any) -> Any:  # noqa: ARG004 - encoding is always latin1
        return load_pickle_file(f)

    @staticmethod
    def loads(data: bytes, **kwargs: Any) -> Any:  # noqa: ARG004
        return load_pickle_file(io.BytesIO(data), "<bytes>")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


@contextlib.contextmanager
def restricted_pickle_loading() -> Iterator[None]:
    """Within the block, Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` weights with
    :func:`load_pickle_file` instead of a plain ``pickle.load``."""
    from detectron2.checkpoint import detection_checkpoint as dc

    if not hasattr(dc, "pickle"):
        raise RuntimeError("this Detectron2 version loads .pkl files differently; "
                           "m2_detectron2.safe_load needs updating")
    previous = dc.pickle
    dc.pickle = _RestrictedPickleModule()
    try:
        yield
    finally:
        dc.pickle = previous
