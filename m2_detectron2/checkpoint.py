"""Detectron2's checkpointer with every weights format read by a restricted loader.

Detectron2 reads ``.pkl`` files with ``pickle.load`` and every other file with
``torch.load`` without ``weights_only``; both can run code stored in the file, and
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` lifts the second's default restriction.
:func:`load_weights_file` reads each format with :mod:`m2_detectron2.safe_load` instead and
returns what Detectron2's own loader returns (``{"model": ..., "matching_heuristics": ...}``),
so that :class:`RestrictedCheckpointer` loads exactly what Detectron2 would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import UnsafePickleError, load_pickle, load_torch_file


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a weights file as Detectron2's checkpointer does, with restricted loaders.

    - ``.pkl``: Detectron2 model-zoo files (``{"model", "__author__", ...}``) as they are;
      any other pickle is taken as Caffe2 / Detectron1 weights (under ``"blobs"`` or at the
      top level, ``*_momentum`` entries dropped) matched by name heuristics.
    - ``.pyth``: pycls checkpoints (``model_state``), matched by name heuristics.
    - ``.safetensors``: a flat state_dict.
    - anything else: a PyTorch file; a dict without ``"model"`` is the model's state_dict.

    Raises:
        UnsafePickleError: the file is missing, not of its format, or holds anything but
            tensors, arrays and plain containers; one line naming the file.
    """
    name = str(path)
    if Path(name).is_dir():
        raise UnsafePickleError(f"{name} is a directory, not a weights file")
    if name.endswith(".pkl"):
        data = load_pickle(name)
        if not isinstance(data, dict):
            raise UnsafePickleError(f"{name}: not a dict of weights")
        if "model" in data and "__author__" in data:
            return data
        blobs = data.get("blobs", data)
        return {"model": {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return {"model": load_file(name, device="cpu")}
        except Exception as e:  # noqa: BLE001 - header or data not readable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UnsafePickleError(f"{name}: not a readable safetensors file ({first})") from None
    data = load_torch_file(name)
    if not isinstance(data, dict):
        raise UnsafePickleError(f"{name}: not a dict of weights")
    if name.endswith(".pyth"):
        state = data.get("model_state")
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{name}: a .pyth file must be a pycls checkpoint with "
                                    "'model_state'")
        return {"model": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                "__author__": "pycls", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


class RestrictedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files are read by :func:`load_weights_file`."""

    def _load_file(self, filename: str) -> dict[str, Any]:
        loaded = load_weights_file(filename)
        # Detectron2 main reads "?matching_heuristics=True" from the path in `load`.
        url = getattr(self, "_parsed_url_during_load", None)
        if url is not None and parse_qs(url.query).get("matching_heuristics") == ["True"]:
            loaded["matching_heuristics"] = True
        return loaded
