"""`DiffusionModelConfig`: the base model and the student LoRA, the model group of every training command (TRL's
`ModelConfig` for diffusion pipelines)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field

from peft import LoraConfig

from .config_checks import check_bool, check_int, check_number, check_output_dir


def _lora_inits() -> list[str]:
    """The string values of PEFT's `init_lora_weights` (`pissa_niter_[number of iters]` stands for `pissa_niter_<n>`),
    plus `true` / `false`."""
    hint = LoraConfig.__dataclass_fields__["init_lora_weights"].type
    hint = typing.get_type_hints(LoraConfig).get("init_lora_weights", hint) if isinstance(hint, str) else hint
    literals = [arg for part in typing.get_args(hint) for arg in typing.get_args(part) if isinstance(arg, str)]
    return ["true", "false", *(literals or ["gaussian", "pissa", "pissa_niter_[number of iters]", "olora"])]


def check_pipeline_class(name: str | None) -> None:
    """`name` is `None` or a diffusers pipeline class (one line otherwise, with the nearest names)."""
    if name is None:
        return
    import difflib

    import diffusers

    if isinstance(name, str):
        found = getattr(diffusers, name, None)
        if isinstance(found, type) and issubclass(found, diffusers.DiffusionPipeline):
            return
    known = [n for n in dir(diffusers) if n.endswith("Pipeline") and n != "DiffusionPipeline"]
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"`pipeline_class` must be a diffusers pipeline class such as WanImageToVideoPipeline, got {name!r}.{hint}"
    )


@dataclass
class DiffusionModelConfig:
    """
    Base model and student adapter of the training commands (TRL's `ModelConfig` for diffusion pipelines). Each field
    is documented by its `help`; in Python, the trainer takes the pipeline (or its id) and a `peft.LoraConfig`
    instead.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The base pipeline: a Hub id (stabilityai/stable-diffusion-3.5-medium), a local folder, or a "
            "registered name (tiny:sd3, tiny:flux, world:base, ...). Its revision and dtype are the training "
            "config's `revision` and `torch_dtype`."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Hub cache for the base and the teachers; None uses HF_HUB_CACHE."}
    )
    pipeline_class: str | None = field(
        default=None,
        metadata={
            "help": "The diffusers pipeline class to run the base as, when not the one its model_index names, e.g. "
            "WanImageToVideoPipeline for Wan-AI/Wan2.2-TI2V-5B-Diffusers (published as a WanPipeline) given a first "
            "frame; None uses the base's own class."
        },
    )
    lora_r: int = field(default=32, metadata={"help": "Rank of the student LoRA (the released recipe: 32)."})
    lora_alpha: int = field(default=64, metadata={"help": "Alpha of the student LoRA (the released recipe: 64)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability of the student LoRA."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules the student adapts; None uses the family's default targets (its attention "
            "projections, and more for some families)."
        },
    )
    lora_init: str = field(
        default="gaussian",
        metadata={
            "help": "PEFT's `init_lora_weights`: 'gaussian' (the default), 'true' (Kaiming A, zero B), 'pissa', ..."
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Use the rank-stabilised LoRA scaling alpha / sqrt(r) instead of alpha / r."}
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError(
                "`model_name_or_path` is required: a Hub id, a local folder, or a registered name such as tiny:sd3."
            )
        if not isinstance(self.model_name_or_path, str):
            raise ValueError(f"`model_name_or_path` must be a string, got {self.model_name_or_path!r}.")
        check_output_dir("cache_dir", self.cache_dir)
        check_pipeline_class(self.pipeline_class)
        check_int("lora_r", self.lora_r, 1)
        check_number("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        targets = self.lora_target_modules
        if targets is not None and (
            isinstance(targets, str)
            or not targets
            or not all(isinstance(name, str) and name.strip() for name in targets)
        ):
            raise ValueError(
                f"`lora_target_modules` must be a non-empty list of module names (e.g. to_q to_k to_v) or None, "
                f"got {targets!r}."
            )
        check_bool("use_rslora", self.use_rslora)
        inits = _lora_inits()
        patterns = [re.escape(name).replace(re.escape("[number of iters]"), r"\d+") for name in inits]
        if not isinstance(self.lora_init, str) or not any(re.fullmatch(p, self.lora_init.lower()) for p in patterns):
            raise ValueError(f"`lora_init` must be one of {inits}, got {self.lora_init!r}.")


def get_student_lora_config(model_args: DiffusionModelConfig, pipeline) -> LoraConfig:
    """The student's `LoraConfig` from `model_args`; the targets default to the family's of `pipeline`."""
    from ..families.base import get_family  # here: the configuration (and `--help`) need no diffusers

    targets = model_args.lora_target_modules or list(type(get_family(pipeline)).default_lora_targets)
    init = {"true": True, "false": False}.get(model_args.lora_init.lower(), model_args.lora_init)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        init_lora_weights=init,
        use_rslora=model_args.use_rslora,
    )
