"""`trl-diffusion-opd eval`: the reward table of a base model and its adapters, with image grids.

```bash
trl-diffusion-opd eval --config eval.yaml
trl-diffusion-opd eval --model_name_or_path tiny:sd3 --adapters '{"toy": "toy:1"}' --prompts '{"brightness": ["a"]}'
python -m trl_diffusion_opd.scripts.eval --config eval.yaml     # the same job
```

The job is `trl_diffusion_opd.evaluation.evaluate_models`; this module parses its arguments
(`DiffusionOPDEvalArguments`) and writes `results.md`, `results.json` and `grids/` under `output_dir` (a video
pipeline also `videos/`: the sample videos; its grids are frame grids).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..sizes import RESOLUTION_HELP, ResolutionLike, parse_resolution
from .utils import (
    PROG,
    TOY_PLACEHOLDER,
    DiffusionParser,
    check_before_loading,
    config_path,
    did_you_mean,
    fail,
    json_dict,
    materialize_toy_adapters,
    one_line,
    quiet_library_logs,
    toy_placeholders,
)


if TYPE_CHECKING:
    from ..evaluation import EvaluationResult

# torch, diffusers and transformers load in the functions that need them (the checks in `__post_init__` too), so
# that `--help` imports none of them.


@dataclass
class DiffusionOPDEvalArguments:
    """
    Arguments of the `trl-diffusion-opd eval` command; each field is documented by its `help`. In Python,
    `evaluate_models` takes the same settings (`evaluation.EvaluationConfig`).
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The base pipeline: a Hub id, a local folder, or a registered name (tiny:sd3, world:base, ...)."
        },
    )
    adapters: dict | str | None = field(
        default=None,
        metadata={
            "help": "Adapters by row label, a mapping (JSON on the command line) {label: adapter}, one table row "
            "each: a local folder, a Hub id owner/repo[/sub/folder][@revision], a dict with `path` and optional "
            "`subfolder`, `revision`, `weight_name`, `guidance_scale`, or toy:<seed> (a random LoRA for the tiny "
            "models). On a two-expert pipeline (Wan 2.2 A14B) a folder's pytorch_lora_weights.safetensors loads "
            "into `transformer` and its pytorch_lora_weights_transformer_2.safetensors into `transformer_2`; an "
            "expert without a file runs the base in that row."
        },
    )
    prompts: dict | str | None = field(
        default=None,
        metadata={
            "help": "Prompt source per column, a mapping (JSON on the command line) {column: source}: a column is a "
            "reward name (ocr, pickscore, ...) or reward@label; a source is a .txt/.jsonl/.csv/.json/.parquet file, "
            "a dataset folder or id, or a list."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments per reward or column, a mapping (JSON on the command line), e.g. "
            '{"geneval": {"url": "http://host:18085"}, "pickscore": {"device": "cuda:1"}}.'
        },
    )
    normalization: dict | str | None = field(
        default=None,
        metadata={"help": "Range [low, high] per reward or column that overrides the ranges of the Average column."},
    )
    include_base: bool = field(default=True, metadata={"help": "Add the base model (no adapter) as the first row."})
    base_label: str = field(default="base", metadata={"help": "Label of the base model's row in the table."})
    num_inference_steps: int = field(
        default=40, metadata={"help": "Sampler steps of the pipeline's own deterministic sampler (Euler ODE)."}
    )
    guidance_scale: float = field(
        default=4.5,
        metadata={"help": "CFG scale (FLUX: the distilled guidance); an adapter's own `guidance_scale` wins."},
    )
    resolution: ResolutionLike = field(
        default=512,
        metadata={"help": RESOLUTION_HELP},
    )
    seed: int = field(
        default=0, metadata={"help": "Image i of a prompt set is drawn with seed `seed + i`, for every model."}
    )
    batch_size: int = field(default=4, metadata={"help": "Images generated per pipeline call."})
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first this many prompts of each set; None uses them all."}
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Length of the T5 prompt embeddings; None is the pipeline's default."}
    )
    num_frames: int | None = field(
        default=None,
        metadata={"help": "Frames per video of a video pipeline (Wan: 1 + 4k); None is the pipeline's default."},
    )
    guidance_scale_2: float | None = field(
        default=None,
        metadata={
            "help": "CFG scale of Wan 2.2 A14B's low-noise expert; None is the pipeline's default (`guidance_scale`)."
        },
    )
    family_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Options of the model family, as in training (e.g. {"auto_resize": false} for FLUX.1 Kontext); a '
            "JSON string on the command line. An option the family does not have is an error."
        },
    )
    video_format: str = field(
        default="webp",
        metadata={
            "help": "Format of a video pipeline's sample videos: webp or gif (Pillow; shown inline on the Hub) or "
            "mp4 (needs the extra `video`: imageio, imageio-ffmpeg).",
            "choices": ["webp", "gif", "mp4"],
        },
    )
    fps: int = field(
        default=16,
        metadata={"help": "Frames per second of the sample videos (Wan 2.1 and 2.2 A14B: 16; TI2V-5B: 24)."},
    )
    grid_size: int = field(
        default=8,
        metadata={
            "help": "Images (videos) per prompt set in each model's grid; a video pipeline's grid is a frame grid, "
            "and these videos are written to videos/<label>/."
        },
    )
    output_dir: str = field(
        default="eval",
        metadata={"help": "Folder where results.md, results.json and grids/<label>.png are written."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the base pipeline when loaded from a path or the Hub.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device of the pipeline; None is CUDA when available, else the CPU."}
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
        from ..trainer.base_config import TORCH_DTYPES
        from ..trainer.config_checks import (
            check_choice,
            check_int,
            check_number,
            check_output_dir,
            check_reward_names,
        )

        for name in ("adapters", "prompts", "reward_kwargs", "normalization", "family_kwargs"):
            setattr(self, name, json_dict(getattr(self, name), name))
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required: a Hub id, a local folder, or tiny:sd3 / tiny:flux.")
        if not self.prompts:
            raise ValueError('`prompts` is required: {reward: prompt source}, e.g. {"ocr": "ocr_test.txt"}.')
        self.resolution = parse_resolution(self.resolution)
        for name in ("num_inference_steps", "batch_size", "grid_size", "fps"):
            check_int(name, getattr(self, name), 1)
        check_int("num_frames", self.num_frames, 1, optional=True)
        check_number("guidance_scale_2", self.guidance_scale_2, 0, optional=True)
        check_choice("video_format", self.video_format, ("webp", "gif", "mp4"))
        check_int("max_prompts", self.max_prompts, 1, optional=True)
        check_int("max_sequence_length", self.max_sequence_length, 1, optional=True)
        check_int("seed", self.seed, 0)
        check_number("guidance_scale", self.guidance_scale, 0)
        check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        check_output_dir("output_dir", self.output_dir)
        check_output_dir("cache_dir", self.cache_dir)
        if not isinstance(self.base_label, str) or not self.base_label.strip():
            raise ValueError(f"`base_label` must be a non-empty string, got {self.base_label!r}.")
        check_reward_names("prompts", [column.split("@")[0] for column in self.prompts])
        for name, kwargs in (self.reward_kwargs or {}).items():
            if not isinstance(kwargs, dict):
                raise ValueError(f"`reward_kwargs['{name}']` must be a mapping of keyword arguments, got {kwargs!r}.")
        for name, bounds in (self.normalization or {}).items():
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise ValueError(f"`normalization['{name}']` must be [low, high], got {bounds!r}.")
            low = check_number(f"normalization['{name}'][0]", bounds[0])
            check_number(f"normalization['{name}'][1]", bounds[1], low, low_open=True)


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `eval`: `(DiffusionOPDEvalArguments,)`, with `--config file.yaml`."""
    return DiffusionParser((DiffusionOPDEvalArguments,), prog=prog or f"{PROG} eval")


def run_evaluation(eval_args: DiffusionOPDEvalArguments) -> EvaluationResult:
    """The `eval` command's job: load the base (and `toy:<seed>` adapters for the tiny models), generate, score,
    write `results.md`, `results.json` and `grids/`. Returns the `EvaluationResult`.

    The prompt files, the adapters' files and what the base's family refuses from its configs alone
    (`utils.check_before_loading`: an image-to-video row without its frame, a size the model cannot run) are checked
    before the base is loaded, and the resolution against the base before toy adapters are written, so that a
    failed start leaves nothing on disk."""
    from ..data import load_prompt_source
    from ..evaluation import EvaluationConfig, evaluate_models, load_base_pipeline
    from ..families.base import get_family
    from ..teachers import check_teacher_files, parse_teacher_spec, resolve_teacher

    prompt_sets = {
        column: load_prompt_source(source, f"prompts '{column}'") for column, source in eval_args.prompts.items()
    }
    for label, spec in toy_placeholders(eval_args.adapters or {}, what="Adapter").items():
        if spec == TOY_PLACEHOLDER or (isinstance(spec, dict) and spec.get("path") == TOY_PLACEHOLDER):
            continue
        parsed = parse_teacher_spec(label, spec)
        resolve_teacher(parsed, cache_dir=eval_args.cache_dir, token=eval_args.hub_token)
        check_teacher_files(parsed, owner=f"Adapter '{label}'")
    check_before_loading(
        eval_args.model_name_or_path,
        eval_args.resolution,
        eval_args.num_frames,
        [prompt_sets],
        revision=eval_args.revision,
        cache_dir=eval_args.cache_dir,
        token=eval_args.hub_token,
        what="Prompts",
    )
    pipeline = load_base_pipeline(
        eval_args.model_name_or_path,
        torch_dtype=eval_args.torch_dtype,
        revision=eval_args.revision,
        cache_dir=eval_args.cache_dir,
        token=eval_args.hub_token,
        device=eval_args.device,
    )
    get_family(pipeline, eval_args.family_kwargs).check_resolution(eval_args.resolution)
    # Toy adapters strong enough (std 1) to change the tiny models' images visibly.
    adapters = materialize_toy_adapters(
        eval_args.adapters or {},
        pipeline,
        Path(eval_args.output_dir) / "_toy_adapters",
        what="Adapter",
        rank=4,
        std=1.0,
    )
    config = EvaluationConfig(
        reward_kwargs=eval_args.reward_kwargs,
        include_base=eval_args.include_base,
        base_label=eval_args.base_label,
        num_inference_steps=eval_args.num_inference_steps,
        guidance_scale=eval_args.guidance_scale,
        resolution=eval_args.resolution,
        seed=eval_args.seed,
        batch_size=eval_args.batch_size,
        max_prompts=eval_args.max_prompts,
        max_sequence_length=eval_args.max_sequence_length,
        num_frames=eval_args.num_frames,
        guidance_scale_2=eval_args.guidance_scale_2,
        family_kwargs=eval_args.family_kwargs,
        video_format=eval_args.video_format,
        fps=eval_args.fps,
        grid_size=eval_args.grid_size,
        normalization=eval_args.normalization,
        output_dir=eval_args.output_dir,
        cache_dir=eval_args.cache_dir,
        token=eval_args.hub_token,
    )
    return evaluate_models(pipeline, prompts=eval_args.prompts, adapters=adapters, config=config)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd eval ARGS`: the reward table of a base model and its adapters, with image grids."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()
    prog = f"{PROG} eval"
    path = config_path(argv)
    parser = make_parser(prog)
    try:
        eval_args, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except yaml.YAMLError as error:
        return fail(prog, f"{path} is not valid YAML: {one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        return fail(prog, one_line(error))
    if config_rest:
        keys = [s.removeprefix("--") for s in config_rest if s.startswith("--")]
        return fail(prog, f"unknown key(s) in {path}: {', '.join(keys)}{did_you_mean(keys, parser.option_names())}.")
    if cli_rest:
        flags = [s.removeprefix("--") for s in cli_rest if s.startswith("--")]
        hint = did_you_mean(flags, parser.option_names()).replace("mean ", "mean --")
        return fail(prog, f"unrecognized arguments: {' '.join(cli_rest)}{hint}.")
    from ..rewards import RewardServerError

    try:
        result = run_evaluation(eval_args)
    except (ValueError, OSError, ImportError, RewardServerError) as error:
        return fail(prog, one_line(error))
    print(result.to_markdown())
    output = Path(eval_args.output_dir)
    videos = f"; videos: {output / 'videos'}" if result.videos else ""
    print(f"Results: {output / 'results.md'} (and results.json); grids: {output / 'grids'}{videos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
