"""Adapter files: the LoRA folders of teachers, students and merges on disk, in diffusers format
(`pytorch_lora_weights.safetensors`, its config in the safetensors metadata) or PEFT format (`adapter_config.json` +
`adapter_model.safetensors`). For a pipeline with several experts (Wan 2.2 A14B), the LoRA of each further expert sits
next to the first as `pytorch_lora_weights_<component>.safetensors` (`expert_weight_name`).

Checking a folder (`check_lora_folder`, `check_lora_fits`) reads only file headers, so every adapter of a run is checked
before the base model loads; `read_lora_folder` returns the weights in PEFT's naming with their `LoraConfig` kwargs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load


DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# LoRA files of the experts after the first (`expert_weight_name`), next to the default file.
EXPERT_LORA_PREFIX, EXPERT_LORA_SUFFIX = "pytorch_lora_weights_", ".safetensors"
EXPERT_LORA_PATTERN = f"{EXPERT_LORA_PREFIX}*{EXPERT_LORA_SUFFIX}"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def holds_lora(folder: Path, weight_name: str | None) -> bool:
    """Whether `folder` holds a LoRA file: `weight_name`, else a default file or another expert's only."""
    names = [weight_name] if weight_name else [DIFFUSERS_LORA_WEIGHTS, PEFT_WEIGHTS]
    if any((folder / name).is_file() for name in names):
        return True
    return weight_name is None and any(folder.glob(EXPERT_LORA_PATTERN))  # another expert's only


def expert_weight_name(expert: str, weight_name: str | None = None) -> str | None:
    """The file of `expert`'s LoRA in an adapter folder: `weight_name` (`None`: the default files) for the first
    expert, `transformer`; `pytorch_lora_weights_<expert>.safetensors` for the others, e.g. Wan 2.2's low-noise
    expert, which diffusers loads with `pipe.load_lora_weights(folder, weight_name=...,
    load_into_transformer_2=True)`."""
    return weight_name if expert == "transformer" else f"{EXPERT_LORA_PREFIX}{expert}{EXPERT_LORA_SUFFIX}"


def expert_of_weight_file(name: str) -> str:
    """The expert whose LoRA a file matching `EXPERT_LORA_PATTERN` holds (the inverse of `expert_weight_name`)."""
    return name.removeprefix(EXPERT_LORA_PREFIX).removesuffix(EXPERT_LORA_SUFFIX)


def has_expert_lora(folder: Path, expert: str, weight_name: str | None = None) -> bool:
    """Whether the adapter folder holds a LoRA for `expert` (`expert_weight_name`)."""
    name = expert_weight_name(expert, weight_name)
    names = [name] if name else [DIFFUSERS_LORA_WEIGHTS, PEFT_WEIGHTS]
    return any((folder / n).is_file() for n in names)


def is_full_weight_folder(folder: Path) -> bool:
    """Whether `folder` holds a whole model (a pipeline's `transformer/` or a transformer folder), not a LoRA."""
    return (folder / "transformer" / "config.json").is_file() or (
        (folder / "config.json").is_file() and not (folder / PEFT_CONFIG).is_file()
    )


def _lora_weight_file(folder: Path, weight_name: str | None, prefix: str) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise ValueError(f"{prefix}{path} does not exist (`weight_name` '{weight_name}').")
        return path
    for name in (DIFFUSERS_LORA_WEIGHTS, PEFT_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(
        f"{prefix}{folder} holds no LoRA: expected '{DIFFUSERS_LORA_WEIGHTS}' (diffusers format) or "
        f"'{PEFT_CONFIG}' + '{PEFT_WEIGHTS}' (PEFT format)."
    )


def _lora_config(folder: Path, path: Path, metadata: dict[str, str], prefix: str) -> dict | None:
    """The LoRA's recorded config: PEFT's `adapter_config.json`, else diffusers' safetensors metadata, else `None`."""
    config_file = folder / PEFT_CONFIG
    if config_file.is_file():
        source = config_file
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{prefix}{config_file} is not valid JSON ({_first_line(error)}).") from error
    else:
        raw = metadata.get("transformer.lora_adapter_metadata") or metadata.get("lora_adapter_metadata")
        if not raw:
            return None
        source = f"the adapter metadata of {path}"
        try:
            config = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"{prefix}{source} is not valid JSON ({_first_line(error)}).") from error
        if isinstance(config, dict):
            config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if not isinstance(config, dict):
        raise ValueError(f"{prefix}{source} is not a JSON object: {str(config)[:80]!r}.")
    try:
        lora = lora_config_for({}, config)
        if isinstance(lora.r, bool) or not isinstance(lora.r, int) or lora.r < 1:
            raise ValueError(f"'r' must be an integer >= 1, got {lora.r!r}")
        if isinstance(lora.lora_alpha, bool) or not isinstance(lora.lora_alpha, (int, float)):
            raise ValueError(f"'lora_alpha' must be a number, got {lora.lora_alpha!r}")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{prefix}{source} is not a valid LoRA config ({_first_line(error)}).") from error
    return config


def check_lora_folder(folder: Path, weight_name: str | None = None, owner: str | None = None) -> Path:
    """Check that `folder` holds a readable LoRA without loading its tensors: the weight file exists and is a
    safetensors file whose keys include LoRA weights, and its config (`adapter_config.json` or the safetensors
    metadata) is a valid `LoraConfig`. Cheap enough to run on every adapter before the base model is loaded.

    Args:
        folder: The adapter's folder.
        weight_name: Weight file; `None` finds `pytorch_lora_weights.safetensors` or `adapter_model.safetensors`.
        owner: Prefix of error messages, e.g. `"Teacher 'ocr'"`.

    Returns:
        The weight file.

    Raises:
        ValueError: one line naming `owner`, the file and what is wrong with it.
    """
    from safetensors import safe_open

    folder = Path(folder)
    prefix = f"{owner}: " if owner else ""
    path = _lora_weight_file(folder, weight_name, prefix)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors' SafetensorError (header too large, truncated, ...) or OSError
        raise ValueError(f"{prefix}{path} is not a valid safetensors file ({_first_line(error)}).") from error
    lora_keys = [key for key in keys if ".lora_" in key or ".lora." in key]
    if not lora_keys:
        found = f"its {len(keys)} tensor(s) are not LoRA weights, e.g. {keys[:2]}" if keys else "it has no tensors"
        raise ValueError(f"{prefix}{path} is an empty adapter: {found}.")
    _lora_config(folder, path, metadata, prefix)
    return path


def read_lora_folder(
    folder: Path, weight_name: str | None = None, owner: str | None = None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a LoRA folder in diffusers or PEFT format (checked by `check_lora_folder` first).

    Args:
        folder: The adapter's folder.
        weight_name: Weight file; `None` finds `pytorch_lora_weights.safetensors` or `adapter_model.safetensors`.
        owner: Prefix of error messages, e.g. `"Teacher 'ocr'"`.

    Returns:
        `(state_dict, lora_config)`: state-dict keys relative to the transformer in PEFT's naming
        (`transformer_blocks.0.attn.to_q.lora_A.weight`); `lora_config` the `LoraConfig` kwargs when the folder
        records them (PEFT's `adapter_config.json` or diffusers' safetensors metadata), else `None`.

    Raises:
        ValueError: the folder holds no LoRA in either format, or a file of it is malformed (one line naming it).
    """
    from safetensors import safe_open

    folder = Path(folder)
    prefix = f"{owner}: " if owner else ""
    path = check_lora_folder(folder, weight_name, owner)
    try:
        # from bytes: `load_file` (safetensors 0.8) keeps ~60 B of Python objects per tensor read for good, which
        # hundreds of teachers' files turn into a leak
        state_dict = load(path.read_bytes())
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # a file that changed or whose data is cut short after its header
        raise ValueError(f"{prefix}{path} is not a valid safetensors file ({_first_line(error)}).") from error
    config = _lora_config(folder, path, metadata, prefix)
    cleaned = {}
    for key, value in state_dict.items():
        key = _transformer_key(key)
        if key is not None:  # text-encoder LoRAs do not touch the transformer this trainer distils
            cleaned[key] = value
    if not any(".lora_B." in key for key in cleaned):
        raise ValueError(f"{prefix}{path} holds no LoRA weights for the transformer (only text-encoder ones).")
    return cleaned, config


def _transformer_key(key: str) -> str | None:
    """A LoRA file's `key` relative to the transformer in PEFT's naming (`transformer_blocks.0.attn.to_q.lora_A.weight`),
    or `None` for a text encoder's weight."""
    for prefix in ("base_model.model.", "transformer."):
        key = key.removeprefix(prefix)
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        return None
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def lora_file_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_lora_fits(
    model: torch.nn.Module, shapes: dict[str, Any], owner: str, component: str = "transformer"
) -> None:
    """Refuse a LoRA that does not fit `model` (the base's `component`) before it is loaded: a module it adapts is
    not there, or has other sizes. PEFT and diffusers only warn about such weights and load the rest, so a LoRA of
    another model would run as a partial adapter, or as the base.

    Args:
        model: The transformer the LoRA would load into.
        shapes: `{key: shape}` of the LoRA's weights as its file names them (`lora_file_shapes`, or a state dict's
            shapes); keys in diffusers' or PEFT's naming (`...to_q.lora_A.weight`) are checked, others (e.g.
            kohya-style keys, which diffusers converts when it loads them) are left to the loader.
        owner: Start of the message, e.g. `"Adapter 'flux' (./flux-lora)"`.
        component: The pipeline component `model` is, for the message.

    Raises:
        ValueError: one line naming `owner`, how many adapted modules do not fit, and an example key.
    """
    modules = dict(model.named_modules())
    adapted, absent, resized = set(), {}, {}
    for key, shape in sorted(shapes.items()):  # the example key does not depend on the file's order
        name = _transformer_key(key)
        if name is None or not re.search(r"\.lora_[AB]\.", name):
            continue
        module_name, _, rest = name.partition(".lora_")
        adapted.add(module_name)
        module = modules.get(module_name)
        if module is None:
            absent.setdefault(module_name, key)
            continue
        layer = getattr(module, "base_layer", module)  # already wrapped by another adapter
        if isinstance(layer, torch.nn.Linear) and len(shape) == 2:
            is_a = rest.startswith("A.")
            found, expected = (shape[1], layer.in_features) if is_a else (shape[0], layer.out_features)
            if found != expected:
                side = "input" if is_a else "output"
                resized.setdefault(module_name, f"'{key}' has {found} {side} features where the base has {expected}")
    if absent:
        raise ValueError(
            f"{owner} does not fit this base: {len(absent)} of the {len(adapted)} modules it adapts are not in its "
            f"{component}, e.g. '{next(iter(absent.values()))}'. Is it a LoRA for another model?"
        )
    if resized:
        raise ValueError(
            f"{owner} does not fit this base: {len(resized)} of the {len(adapted)} modules it adapts have other "
            f"sizes in its {component}, e.g. {next(iter(resized.values()))}. Is it a LoRA for another model?"
        )


def lora_module_names(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Module paths that a LoRA state dict adapts (`...attn.to_q` for `...attn.to_q.lora_A.weight`)."""
    return {key.split(".lora_")[0] for key in state_dict if ".lora_" in key}


def lora_config_for(state_dict: dict[str, torch.Tensor], config: dict | None) -> LoraConfig:
    """The `LoraConfig` of a LoRA state dict: from its recorded config when there is one (so alpha survives),
    else inferred as diffusers does (rank from `lora_B`, alpha = rank, the adapted modules as exact targets)."""
    if config is not None:
        known = set(LoraConfig.__dataclass_fields__)
        skip = {"init_lora_weights", "inference_mode", "base_model_name_or_path", "revision", "task_type"}
        kwargs = {k: v for k, v in config.items() if k in known and k not in skip}
        kwargs.pop("peft_type", None)
        return LoraConfig(**kwargs)
    ranks = {key.split(".lora_B")[0]: v.shape[1] for key, v in state_dict.items() if ".lora_B." in key and v.ndim > 1}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{m}$": r for m, r in ranks.items() if r != rank}
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )


def adapter_metadata(config: LoraConfig) -> dict:
    """`config.to_dict()` with its set-valued fields (`target_modules`, ...) as sorted lists: the adapter metadata
    diffusers writes into `pytorch_lora_weights.safetensors`. A set's order follows Python's per-process string
    hashing, so unsorted, two runs that train the same weights would write different metadata."""
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def load_adapter_weights(
    transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter: str, label: str
) -> None:
    """Copy a LoRA `state_dict` (PEFT naming, relative to `transformer`) into the adapter `adapter`, exactly.

    Raises:
        ValueError: the weights do not fit the adapter's config, or some are missing or left over (`label` names
            the source in the message).
    """
    try:
        result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter)
    except RuntimeError as error:  # shapes that disagree with the recorded rank
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"{label} does not fit its own config: {' '.join(lines[:2])}") from error
    expected = {k for k in transformer.state_dict() if f".{adapter}." in k}
    not_loaded = sorted(k for k in result.missing_keys if k in expected)
    if not_loaded or result.unexpected_keys:
        raise ValueError(
            f"{label} did not load exactly: missing {not_loaded[:3]}, unexpected {list(result.unexpected_keys)[:3]}."
        )
