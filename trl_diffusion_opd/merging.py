"""Merging LoRA adapters without training: PEFT's `add_weighted_adapter` on the base's transformer(s), written as a
diffusers LoRA that `pipe.load_lora_weights` loads (the baseline a user tries before distilling the teachers).

```python
from trl_diffusion_opd.merging import merge_adapters
from trl_diffusion_opd.registry import load_pipeline

pipe = load_pipeline("world:base")
merged = merge_adapters(pipe, {"letters": "world:letters", "aesthetic": "world:aesthetic"}, weights=0.5)
merged.save("merged", pipe)  # pytorch_lora_weights.safetensors + README.md
```

The combination types are PEFT's (`LoraModel.add_weighted_adapter`); with weights w_i and each adapter's update
ΔW_i = s_i B_i A_i (s_i its alpha / r scaling):

- `cat` is the weighted sum of the deltas, exactly: ΔW = Σ w_i ΔW_i (A = [w_i s_i A_i] stacked, B = [B_i] side by
  side), of rank Σ r_i; any ranks. The default.
- `svd` is that same sum truncated to `svd_rank` (default: the largest r_i) by an SVD; exact when
  `svd_rank` >= Σ r_i.
- `linear` sums the factors, A = Σ √(w_i s_i) A_i and B = Σ √(w_i s_i) B_i, so ΔW = Σ_ij √(w_i s_i w_j s_j) B_i A_j:
  *not* the sum of the deltas (cross terms B_i A_j), equal ranks only.
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` apply TIES / DARE / magnitude pruning (`density`) to the A and
  B factors separately, like `linear` (equal ranks only); their `*_svd` forms (`ties_svd`, ...) apply them to the
  deltas ΔW_i and then truncate by SVD, like `svd` (any ranks).

The merged adapter's scaling is 1 (alpha = r). For several experts (Wan 2.2 A14B) each expert's LoRAs are merged
separately and written as their own file (`lora_io.expert_weight_name`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .families.base import get_family
from .lora_io import (
    adapter_metadata,
    check_lora_fits,
    expert_weight_name,
    has_expert_lora,
    lora_config_for,
    read_lora_folder,
)
from .teachers import TeacherSpec, check_teacher_files, parse_teacher_spec, resolve_teacher


COMBINATION_TYPES = (
    "cat",
    "svd",
    "linear",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Combined factor by factor (A with A, B with B): the adapters must have one rank.
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Prune to a `density` (TIES, DARE, magnitude pruning).
DENSITY_TYPES = tuple(name for name in COMBINATION_TYPES if name.startswith(("ties", "dare", "magnitude")))
SIGN_TYPES = tuple(name for name in COMBINATION_TYPES if "ties" in name)
# What each combination computes, for `--help`, the model card and the docs.
COMBINATION_MEANINGS = {
    "cat": "the weighted sum of the deltas, exactly: ΔW = Σ w_i ΔW_i (rank Σ r_i)",
    "svd": "Σ w_i ΔW_i truncated by SVD to `svd_rank` (default: the largest rank)",
    "linear": "weighted sums of the A and of the B factors (not Σ w_i ΔW_i: it has cross terms B_i A_j)",
    "ties": "TIES (trim to `density`, elect signs, disjoint mean) on the A and B factors separately",
    "ties_svd": "TIES on the deltas ΔW_i, then SVD to `svd_rank`",
    "dare_linear": "DARE (drop at random to `density`, rescale) on the A and B factors, then a weighted sum",
    "dare_ties": "DARE on the A and B factors, then TIES' sign election",
    "dare_linear_svd": "DARE on the deltas ΔW_i, then a weighted sum and SVD to `svd_rank`",
    "dare_ties_svd": "DARE on the deltas ΔW_i, then TIES' sign election and SVD to `svd_rank`",
    "magnitude_prune": "magnitude pruning to `density` on the A and B factors, then a weighted sum",
    "magnitude_prune_svd": "magnitude pruning of the deltas ΔW_i, then a weighted sum and SVD to `svd_rank`",
}
MERGED = "merged"


def check_merge_settings(
    labels: list[str],
    weights: dict[str, Any] | float | None = None,
    combination_type: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
) -> dict[str, float]:
    """Check the settings of a merge of the adapters `labels` and return `{label: weight}`.

    `weights` is a mapping `{label: weight}` naming every adapter, one number for all, or `None` (1 / N each: the
    mean of the deltas with `cat`). Weights may be negative (PEFT subtracts that adapter), not all zero.

    Raises:
        ValueError: one line naming the setting: no adapters, a weight that is not a finite number, a weight for an
            unknown adapter or none for one, an unknown combination type, a `density` outside (0, 1] or missing
            where TIES / DARE / magnitude pruning need it (or given where nothing uses it), an `svd_rank` < 1 or
            with a type that does no SVD.
    """
    if not labels:
        raise ValueError("`adapters` is empty: give at least one adapter to merge, {label: spec}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"`combination_type` must be one of {COMBINATION_TYPES}, got {combination_type!r}.")
    if weights is None:
        weights = 1.0 / len(labels)
    if not isinstance(weights, dict):
        weights = dict.fromkeys(labels, weights)
    unknown = [str(label) for label in weights if label not in labels]
    if unknown:
        raise ValueError(f"`weights` names adapter(s) {unknown} that are not in `adapters` {list(labels)}.")
    missing = [label for label in labels if label not in weights]
    if missing:
        raise ValueError(
            f"`weights` has no weight for adapter(s) {missing}: give every adapter a weight, or one number."
        )
    checked = {}
    for label in labels:
        value = weights[label]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`weights['{label}']` must be a finite number, got {value!r}.")
        checked[label] = float(value)
    if not any(checked.values()):
        raise ValueError("`weights` are all zero: the merge would be the base model.")
    if combination_type in DENSITY_TYPES:
        if density is None:
            raise ValueError(f"`combination_type` '{combination_type}' needs `density`, the fraction kept, in (0, 1].")
    elif density is not None:
        raise ValueError(f"`density` is used by {DENSITY_TYPES} only, not by '{combination_type}'.")
    if density is not None and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1
    ):
        raise ValueError(f"`density` must be a number in (0, 1], got {density!r}.")
    if svd_rank is not None:
        if not combination_type.endswith("svd"):
            raise ValueError(f"`svd_rank` is used by the *svd combination types only, not by '{combination_type}'.")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise ValueError(f"`svd_rank` must be an integer >= 1, got {svd_rank!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"`majority_sign_method` must be 'total' or 'frequency', got {majority_sign_method!r}.")
    return checked


def resolve_adapters(
    adapters: dict[str, Any], cache_dir: str | None = None, token: str | bool | None = None
) -> dict[str, TeacherSpec]:
    """Parse and resolve `{label: spec}` (the teachers' spec forms: a folder, a Hub id, a registered name such as
    `world:letters`) and check their LoRA files, before any model is loaded.

    Raises:
        ValueError: a malformed spec, an adapter not found, a full-weight model, or a malformed LoRA file.
    """
    specs = {}
    for label, spec in adapters.items():
        try:
            parsed = parse_teacher_spec(str(label), spec)
            if parsed.needs_base:  # `toy:<seed>`: written by the trainers for their base
                raise ValueError(
                    f"Adapter '{label}': '{parsed.display}' is made for a base when training; give a folder."
                )
            resolve_teacher(parsed, cache_dir=cache_dir, token=token)
        except ValueError as error:  # the teachers' messages, about an adapter here
            raise ValueError(str(error).replace(f"Teacher '{label}'", f"Adapter '{label}'", 1)) from error
        if parsed.full_weight:
            raise ValueError(f"Adapter '{label}': '{parsed.display}' is a full model, not a LoRA to merge.")
        check_teacher_files(parsed, owner=f"Adapter '{label}'")
        specs[str(label)] = parsed
    return specs


@dataclass
class MergedAdapter:
    """A merged LoRA: per expert (pipeline component), its state dict in PEFT naming
    (`transformer_blocks.0.attn.to_q.lora_A.weight`) and its `LoraConfig` (alpha = r: scaling 1).

    Attributes:
        state_dicts: `{expert: state dict}` for the experts some adapter has a LoRA for.
        configs: `{expert: LoraConfig}`.
        sources: `{label: TeacherSpec}` of the merged adapters.
        weights: `{label: weight}`.
        combination_type, density, svd_rank, majority_sign_method, seed: The merge's settings.
    """

    state_dicts: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, LoraConfig]
    sources: dict[str, TeacherSpec]
    weights: dict[str, float]
    combination_type: str = "cat"
    density: float | None = None
    svd_rank: int | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    @property
    def meaning(self) -> str:
        """What the combination computes, in words (`COMBINATION_MEANINGS`)."""
        return COMBINATION_MEANINGS[self.combination_type]

    def save(
        self,
        output_dir: str | os.PathLike,
        pipeline: Any,
        base_name: str | None = None,
        model_name: str | None = None,
        card: bool = True,
    ) -> Path:
        """Write the merge in diffusers' LoRA format, as the trainers write a student: `pytorch_lora_weights.safetensors`
        with its adapter metadata (and `pytorch_lora_weights_<expert>.safetensors` for a further expert), loadable
        by `pipe.load_lora_weights(output_dir)`; with `card`, a model card `README.md` (`hub.create_merge_card`).
        `base_name` names the base on the card (a Hub id or a registered name; default: the pipeline's
        `name_or_path`). Returns the folder."""
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        pipeline_class = get_family(pipeline).pipeline_class
        for expert, state in self.state_dicts.items():
            pipeline_class.save_lora_weights(
                folder,
                transformer_lora_layers=state,
                transformer_lora_adapter_metadata=adapter_metadata(self.configs[expert]),
                weight_name=expert_weight_name(expert),
            )
        if card:
            from .hub import CARD_NAME, create_merge_card

            base = base_name or getattr(pipeline, "name_or_path", None) or None
            create_merge_card(self, pipeline, base, folder, model_name=model_name).save(str(folder / CARD_NAME))
        return folder


def merge_adapters(
    pipeline: Any,
    adapters: dict[str, Any],
    weights: dict[str, float] | float | None = None,
    combination_type: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> MergedAdapter:
    """Merge LoRA adapters of `pipeline`'s base with PEFT's `add_weighted_adapter` (see the module docstring for
    what each `combination_type` computes). The pipeline is left as it was (the merge's LoRA layers are unloaded).

    Args:
        pipeline: The base pipeline (without LoRA adapters loaded).
        adapters: `{label: spec}`: folders, Hub ids, registered names (`world:letters`) or spec dicts.
        weights: `{label: weight}`, one number for all, or `None` (1 / N each).
        combination_type: One of `COMBINATION_TYPES`; `cat` is the exact weighted sum of the deltas.
        density: Fraction kept by TIES / DARE / magnitude pruning, in (0, 1].
        svd_rank: Rank of the `*svd` types' result (default: the largest rank of the adapters).
        majority_sign_method: TIES' sign election, `total` or `frequency`.
        seed: Seed of DARE's random drop (the merge is otherwise deterministic).
        cache_dir, token: For adapters on the Hub.

    Raises:
        ValueError: one line: bad settings (`check_merge_settings`), an adapter not found or malformed, an adapter
            that does not fit the base (a LoRA of another model), ranks that differ for a factor-wise type, or a
            DoRA adapter.
    """
    weights = check_merge_settings(list(adapters), weights, combination_type, density, svd_rank, majority_sign_method)
    specs = resolve_adapters(adapters, cache_dir=cache_dir, token=token)
    family = get_family(pipeline)
    state_dicts, configs = {}, {}
    for expert, transformer in family.experts.items():
        parts = {}
        for label, spec in specs.items():
            if not has_expert_lora(spec.local_dir, expert, spec.weight_name):
                continue  # a LoRA for some experts only: it adds nothing to this one
            owner = f"Adapter '{label}'"
            state, config = read_lora_folder(spec.local_dir, expert_weight_name(expert, spec.weight_name), owner)
            shapes = {key: value.shape for key, value in state.items()}
            check_lora_fits(transformer, shapes, f"{owner} ({spec.display})", component=expert)
            lora_config = lora_config_for(state, config)
            if lora_config.use_dora:
                raise ValueError(f"{owner} ({spec.display}) is a DoRA adapter, which PEFT's merges do not take.")
            parts[label] = (state, lora_config)
        if parts:
            state_dicts[expert], configs[expert] = _merge_expert(
                transformer, parts, weights, combination_type, density, svd_rank, majority_sign_method, seed
            )
    if not state_dicts:
        raise ValueError(f"None of the adapters has a LoRA for this base's experts ({', '.join(family.experts)}).")
    return MergedAdapter(
        state_dicts=state_dicts,
        configs=configs,
        sources=specs,
        weights=weights,
        combination_type=combination_type,
        density=density,
        svd_rank=svd_rank,
        majority_sign_method=majority_sign_method,
        seed=seed,
    )


def _merge_expert(
    transformer: torch.nn.Module,
    parts: dict[str, tuple[dict[str, torch.Tensor], LoraConfig]],
    weights: dict[str, float],
    combination_type: str,
    density: float | None,
    svd_rank: int | None,
    majority_sign_method: str,
    seed: int,
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Merge `{label: (state dict, config)}` on one transformer; returns the merged state dict and config."""
    if getattr(transformer, "peft_config", None):
        raise ValueError(
            f"The base already carries LoRA adapters ({', '.join(transformer.peft_config)}): merge on a base "
            "without adapters (unload them first)."
        )
    ranks = {label: _max_rank(config) for label, (_, config) in parts.items()}
    if combination_type in FACTOR_TYPES and len(set(ranks.values())) > 1:
        raise ValueError(
            f"`combination_type` '{combination_type}' combines the A and B factors and needs adapters of one rank, "
            f"got ranks {ranks}; use 'cat' (the exact weighted sum of the deltas), 'svd' or a *_svd type."
        )
    # Internal adapter names: labels may collide with PEFT's module names (`lora_A`, ...).
    names = {label: f"source_{index}" for index, label in enumerate(parts)}
    model = None
    try:
        for label, (state, config) in parts.items():
            config = replace(config, inference_mode=True)
            if model is None:
                model = LoraModel(transformer, config, names[label])
            else:
                model.peft_config[names[label]] = config
                model.inject_adapter(transformer, names[label])
            result = set_peft_model_state_dict(transformer, state, adapter_name=names[label])
            if result.unexpected_keys:
                raise ValueError(
                    f"Adapter '{label}' did not load exactly: unexpected {list(result.unexpected_keys)[:3]}."
                )
        kwargs = {"density": density, "majority_sign_method": majority_sign_method}
        if combination_type.endswith("svd"):
            kwargs["svd_rank"] = svd_rank
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)  # DARE's random drop
            try:
                model.add_weighted_adapter(
                    [names[label] for label in parts],
                    [weights[label] for label in parts],
                    MERGED,
                    combination_type=combination_type,
                    **kwargs,
                )
            except (ValueError, TypeError) as error:
                raise ValueError(f"PEFT could not merge the adapters ({combination_type}): {error}") from error
        merged = {
            key: value.detach().to("cpu", copy=True).contiguous()
            for key, value in get_peft_model_state_dict(transformer, adapter_name=MERGED).items()
        }
        config = model.peft_config[MERGED]
    finally:
        if model is not None:
            model.unload()  # the base's own layers back, without any LoRA
            for attribute in ("peft_config", "_hf_peft_config_loaded"):
                if attribute in vars(transformer):
                    delattr(transformer, attribute)
    # The merged factors carry the weights and scalings (PEFT writes them for a scaling of 1), whatever the first
    # adapter's alpha or rsLoRA setting that PEFT copied into the merged config.
    config = replace(
        config, lora_alpha=config.r, use_rslora=False, rank_pattern={}, alpha_pattern={}, inference_mode=False
    )
    return merged, config


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r
