"""Checkpoint files that load without running code: safetensors for tensors, JSON for everything else.

A pickle (`torch.load(..., weights_only=False)`) runs whatever its `__reduce__` says, so a checkpoint folder from
anywhere could execute code on resume. The package therefore writes its own checkpoint files with these helpers and
reads legacy pickles only with `torch.load(..., weights_only=True)` (`load_weights_only`), which refuses any global
outside torch's allow-list.

* `save_ema_state` / `load_ema_state`: diffusers' `EMAModel` state (shadow parameters + its scalar settings).
* `save_tensor_tree` / `load_tensor_tree`: a nested structure of dicts (string keys), lists, tensors and JSON scalars,
  e.g. an RL trainer's generated batch; tensors keep their dtype and values bit for bit.

Both loaders return tensors in memory of their own (`_owned`), never views into safetensors' read buffer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


_TENSOR = "__tensor__"
_EMA_SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` copied into memory from torch's allocator (64-byte aligned, like the tensors a run computes).

    safetensors hands out tensors that start wherever they lie in the file, behind a header of any length, so a
    tensor read back can start at any 4-byte offset. CPU kernels take another path on such an address: a linear layer
    on a (2, 64) input 28 bytes off alignment rounds differently in the last bit, so a resumed step that reuses a
    stored batch would not compute what the uninterrupted run computed."""
    return tensor.clone(memory_format=torch.contiguous_format)


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, containers and numbers only; a pickle naming any other global
    (e.g. a `__reduce__` payload) raises `pickle.UnpicklingError` before anything of it runs."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a kill while saving leaves the previous file intact


def save_tensor_tree(tree: Any, path: str | os.PathLike) -> None:
    """Write `tree` to one safetensors file: tensors as entries, the structure and the other leaves as JSON metadata.

    Args:
        tree: dicts with string keys, lists / tuples (read back as lists), tensors, and JSON scalars (str, int,
            float, bool, None).
        path: The `.safetensors` file.

    Raises:
        TypeError: a leaf is neither a tensor nor JSON-serialisable, or a dict key is not a string.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            name = f"t{len(tensors)}"
            # a copy: views (e.g. x0 = states[-1]) share storage, which safetensors refuses
            tensors[name] = node.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name, "device": str(node.device)}
        if isinstance(node, dict):
            if not all(isinstance(key, str) for key in node):
                raise TypeError(f"only string dict keys can be saved, got {sorted(map(repr, node))[:3]}")
            return {key: encode(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [encode(value) for value in node]
        if node is None or isinstance(node, (str, int, float, bool)):
            return node
        raise TypeError(f"cannot save a {type(node).__name__} without pickle")

    structure = json.dumps(encode(tree), allow_nan=True)
    _atomic_save(tensors, {"tree": structure}, Path(path))


def load_tensor_tree(path: str | os.PathLike, device: str | torch.device | None = None) -> Any:
    """Read what `save_tensor_tree` wrote.

    Args:
        path: The `.safetensors` file.
        device: Where tensors that were not on the CPU go; `None` puts them back on their saved device.
    """
    with safe_open(str(path), framework="pt") as handle:
        structure = json.loads(handle.metadata()["tree"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}

    def decode(node: Any) -> Any:
        if isinstance(node, dict) and _TENSOR in node:
            tensor = tensors[node[_TENSOR]]
            saved = torch.device(node["device"])
            target = saved if saved.type == "cpu" or device is None else torch.device(device)
            return _owned(tensor) if target.type == "cpu" else tensor.to(target)
        if isinstance(node, dict):
            return {key: decode(value) for key, value in node.items()}
        if isinstance(node, list):
            return [decode(value) for value in node]
        return node

    return decode(structure)


def save_ema_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an `EMAModel.state_dict()`: `shadow_params` as safetensors entries, the scalars as JSON metadata."""
    tensors = {
        f"shadow_params.{i}": p.detach().to("cpu", copy=True).contiguous()
        for i, p in enumerate(state["shadow_params"])
    }
    scalars = {key: state[key] for key in _EMA_SCALARS if key in state}
    _atomic_save(tensors, {"ema": json.dumps(scalars), "num_shadow_params": str(len(tensors))}, Path(path))


def load_ema_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read what `save_ema_state` wrote, as a dict for `EMAModel.load_state_dict` (tensors on the CPU)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        count = int(metadata["num_shadow_params"])
        shadow = [_owned(handle.get_tensor(f"shadow_params.{i}")) for i in range(count)]
    return {**json.loads(metadata["ema"]), "shadow_params": shadow}
