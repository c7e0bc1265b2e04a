"""`trl-diffusion-opd merge`: merge LoRA adapters (the teachers) into one, with no training: PEFT's merges.

```bash
trl-diffusion-opd merge --model_name_or_path world:base \\
    --adapters '{"composition": "world:composition", "letters": "world:letters", "aesthetic": "world:aesthetic"}' \\
    --weights 0.3333 --combination_type cat --output_dir merged
trl-diffusion-opd merge --config merge.yaml                     # the same settings in a YAML file
trl-diffusion-opd train --config recipe.yaml --student_adapter merged   # a DiffusionOPD student started from it
```

The job is `trl_diffusion_opd.merging.merge_adapters` and `MergedAdapter.save`; this module parses its arguments
(`DiffusionOPDMergeArguments`) and writes `pytorch_lora_weights.safetensors` (diffusers format, with its adapter
metadata; `pytorch_lora_weights_<expert>.safetensors` for a further expert) and a model card `README.md` under
`output_dir`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..lora_io import DIFFUSERS_LORA_WEIGHTS
from ..merging import COMBINATION_MEANINGS, COMBINATION_TYPES, check_merge_settings, merge_adapters, resolve_adapters
from ..registry import load_pipeline
from ..trainer.base_config import TORCH_DTYPES
from ..trainer.config_checks import check_choice, check_int, check_output_dir
from .utils import PROG, DiffusionParser, config_path, fail, json_dict, one_line


@dataclass
class DiffusionOPDMergeArguments:
    """
    Arguments of the `trl-diffusion-opd merge` command; each field is documented by its `help`. In Python,
    `trl_diffusion_opd.merging.merge_adapters` takes the same settings.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The base pipeline the adapters were trained on: a Hub id, a local folder, or a registered name "
            "(world:base, tiny:sd3, ...)."
        },
    )
    adapters: dict | str | None = field(
        default=None,
        metadata={
            "help": "Adapters to merge, a mapping (JSON on the command line) {label: spec}: a local folder, a Hub id "
            "owner/repo[/sub/folder][@revision], a registered name (world:letters) or a dict with `path` and "
            "optional `subfolder`, `revision`, `weight_name`; diffusers or PEFT format."
        },
    )
    weights: dict | float | str | None = field(
        default=None,
        metadata={
            "help": "Weight of each adapter: a mapping {label: weight} naming every adapter, or one number for all; "
            "None gives 1/N each (with `cat`, the mean of the deltas). A negative weight subtracts that adapter."
        },
    )
    combination_type: str = field(
        default="cat",
        metadata={
            "help": "PEFT's `add_weighted_adapter` combination: "
            + "; ".join(f"{name}: {meaning}" for name, meaning in COMBINATION_MEANINGS.items())
            + ".",
            "choices": list(COMBINATION_TYPES),
        },
    )
    density: float | None = field(
        default=None,
        metadata={"help": "Fraction of the weights kept by TIES, DARE and magnitude pruning, in (0, 1] (e.g. 0.5)."},
    )
    svd_rank: int | None = field(
        default=None,
        metadata={"help": "Rank of the *svd combinations' result; None is the largest rank of the adapters."},
    )
    majority_sign_method: str = field(
        default="total",
        metadata={
            "help": "TIES' sign election: total (by summed magnitude) or frequency.",
            "choices": ["total", "frequency"],
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of DARE's random drop (every other merge is deterministic)."})
    output_dir: str = field(
        default="merged",
        metadata={"help": "Folder where pytorch_lora_weights.safetensors and the model card README.md are written."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the base pipeline when loaded from a path or the Hub (the LoRA weights merge in "
            "float32 whatever the base's dtype).",
            "choices": list(TORCH_DTYPES),
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of the base model on the Hub."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Hub cache for the base and the adapters; None uses HF_HUB_CACHE."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token for private repos; None uses your login or HF_TOKEN."}
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required: the base the adapters were trained on.")
        self.adapters = json_dict(self.adapters, "adapters", required=True)
        if isinstance(self.weights, str):
            self.weights = (
                json_dict(self.weights, "weights") if self.weights.lstrip().startswith("{") else self.weights
            )
            if isinstance(self.weights, str):
                try:
                    self.weights = float(self.weights)
                except ValueError:
                    raise ValueError(
                        f"`weights` must be a mapping {{label: weight}} or a number, got {self.weights!r}."
                    ) from None
        check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        check_int("seed", self.seed, 0)
        check_output_dir("output_dir", self.output_dir)
        check_output_dir("cache_dir", self.cache_dir)
        self.weights = check_merge_settings(
            list(self.adapters),
            self.weights,
            self.combination_type,
            self.density,
            self.svd_rank,
            self.majority_sign_method,
        )


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `merge`: `(DiffusionOPDMergeArguments,)`, with `--config file.yaml`."""
    return DiffusionParser((DiffusionOPDMergeArguments,), prog=prog or f"{PROG} merge")


def run_merge(args: DiffusionOPDMergeArguments) -> Path:
    """The `merge` command's job: check the adapters' files, load the base, merge, write the adapter and its card.
    Returns the output folder. The adapters are checked before the base is loaded, so a failed start writes
    nothing."""
    resolve_adapters(args.adapters, cache_dir=args.cache_dir, token=args.hub_token)
    pipeline = load_pipeline(
        args.model_name_or_path,
        torch_dtype=args.torch_dtype,
        revision=args.revision,
        cache_dir=args.cache_dir,
        token=args.hub_token,
    )
    merged = merge_adapters(
        pipeline,
        args.adapters,
        weights=args.weights,
        combination_type=args.combination_type,
        density=args.density,
        svd_rank=args.svd_rank,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
        cache_dir=args.cache_dir,
        token=args.hub_token,
    )
    return merged.save(args.output_dir, pipeline, base_name=args.model_name_or_path)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd merge ARGS`: merge LoRA adapters into one (no training)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"{PROG} merge"
    path = config_path(argv)
    try:
        args, config_rest, cli_rest = make_parser(prog).parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except yaml.YAMLError as error:
        return fail(prog, f"{path} is not valid YAML: {one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        return fail(prog, one_line(error))
    if config_rest:
        keys = ", ".join(s.removeprefix("--") for s in config_rest if s.startswith("--"))
        return fail(prog, f"unknown key(s) in {path}: {keys}.")
    if cli_rest:
        return fail(prog, f"unrecognized arguments: {' '.join(cli_rest)}.")
    try:
        folder = run_merge(args)
    except (ValueError, OSError) as error:
        return fail(prog, one_line(error))
    weights = ", ".join(f"{label} {weight:g}" for label, weight in args.weights.items())
    print(
        f"Merged {len(args.adapters)} adapter(s) ({args.combination_type}; weights {weights}) into "
        f"{folder.resolve() / DIFFUSERS_LORA_WEIGHTS}, with its model card README.md. Load it with "
        f'`pipe.load_lora_weights("{folder}")`, or start a DiffusionOPD student from it with `--student_adapter {folder}`.'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
