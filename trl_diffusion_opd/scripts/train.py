"""`trl-diffusion-opd train`: distil reward-specific teachers into one LoRA student with `DiffusionOPDTrainer`.

```bash
trl-diffusion-opd train --config examples/configs/tiny.yaml              # the embedded tiny default, offline, CPU
trl-diffusion-opd train --config recipe.yaml --learning_rate 1e-4        # command-line flags override the YAML
trl-diffusion-opd train --config recipe.yaml --accelerate_config multi_gpu --num_processes 8
python -m trl_diffusion_opd.scripts.train --config recipe.yaml            # the same job
```

Three argument groups are parsed with `trl.TrlParser`: `DiffusionOPDScriptArguments` (teachers and prompts),
`DiffusionOPDConfig` (training) and `DiffusionModelConfig` (base model and student LoRA). Dict fields (`teachers`,
`prompts`, `teacher_guidance_scale`, `task_weights`, ...) are YAML mappings in a config file and JSON objects on the
command line. Any `accelerate launch` option (`--num_processes`, `--mixed_precision`, ...) or
`--accelerate_config PRESET_OR_PATH` (a TRL preset such as `multi_gpu`, or an accelerate config file), on the command
line or in the YAML, relaunches the job through `accelerate launch`.

Registered names work for the base and the teachers (`tiny:sd3`, `world:base`, `world:letters`:
`trl_diffusion_opd.registry`), and a teacher `toy:<seed>` is a random LoRA for a tiny base, written to
`output_dir/_toy_teachers/<task>` (files starting with `_` are never pushed to the Hub).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .utils import (
    PROG,
    TOY_PLACEHOLDER,
    TOY_TEACHERS_DIR,
    DiffusionParser,
    check_before_loading,
    check_resolution,
    json_dict,
    load_base,
    load_prompts,
    materialize_toy_adapters,
    quiet_library_logs,
    run_training,
    toy_placeholders,
    training_main,
)


# The configurations load in `make_parser`, the trainer, the teachers and the data in the functions that use them:
# `--help` imports no diffusers, and `main` quiets other libraries' noise before transformers loads.
if TYPE_CHECKING:
    from ..trainer.model_config import DiffusionModelConfig
    from ..trainer.opd_config import DiffusionOPDConfig
    from ..trainer.opd_trainer import DiffusionOPDTrainer


@dataclass
class DiffusionOPDScriptArguments:
    """
    Teachers and prompts of the `train` command; each field is documented by its `help`. In Python, they are the
    `teachers`, `train_dataset` and `eval_dataset` arguments of `DiffusionOPDTrainer`.
    """

    teachers: dict | str | None = field(
        default=None,
        metadata={
            "help": "Teacher per task, a mapping (JSON on the command line) {task: spec}: a local folder, a Hub id "
            "owner/repo[/sub/folder][@revision], a registered name (world:letters), a dict with `path` and optional "
            "`subfolder`, `revision`, `guidance_scale`, `weight`, `weight_name`, or a list of those (a weighted "
            "ensemble). toy:<seed> is a random LoRA for the tiny models."
        },
    )
    prompts: dict | str | None = field(
        default=None,
        metadata={
            "help": "Prompt source per task, a mapping (JSON on the command line) {task: source}: a .txt file (one "
            "prompt per line), a .jsonl file with a `prompt` field (other fields are kept as metadata), a "
            ".csv/.json/.parquet file, a local dataset folder, a Hub dataset id (id:split picks the split), a "
            "registered name or an inline list of prompts."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "One prompt source for all tasks, with 'prompt' and 'task' columns: a Hub dataset id, a local "
            "dataset folder or a data file. Ignored when `prompts` is given."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of the `dataset_name` dataset."}
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split of `dataset_name` whose prompts are trained on."}
    )
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Split of `dataset_name` whose prompts measure the KL to the teachers in `evaluate()`."},
    )
    eval_prompts: dict | str | None = field(
        default=None, metadata={"help": "Held-out prompts per task, a mapping in the same form as `prompts`."}
    )

    def __post_init__(self):
        self.teachers = json_dict(self.teachers, "teachers", required=True)
        self.prompts = json_dict(self.prompts, "prompts")
        self.eval_prompts = json_dict(self.eval_prompts, "eval_prompts")
        if self.prompts is None and self.dataset_name is None:
            raise ValueError("Give the prompts: `prompts` ({task: source}) or `dataset_name` (with a 'task' column).")


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `train`: `(DiffusionOPDScriptArguments, DiffusionOPDConfig, DiffusionModelConfig)`, with
    `--config file.yaml`."""
    from ..trainer.model_config import DiffusionModelConfig
    from ..trainer.opd_config import DiffusionOPDConfig

    return DiffusionParser(
        (DiffusionOPDScriptArguments, DiffusionOPDConfig, DiffusionModelConfig),
        prog=prog or f"{PROG} train",
        example="tiny.yaml",
    )


def resolve_teachers(
    teachers: dict[str, Any], cache_dir: str | None = None, token: str | bool | None = None
) -> dict[str, list]:
    """Parse `{task: spec}` into `TeacherSpec`s and resolve each one (download from the Hub or find it in the
    cache) once, with `cache_dir` and `token`, checking its LoRA files; the trainer then reuses the resolved folders.
    `toy:<seed>` specs must have been materialised (`check_teachers` accepts them)."""
    from ..teachers import STUDENT, check_teacher_files, parse_teachers, resolve_teacher

    specs = parse_teachers(teachers, reserved=(STUDENT,))
    for task_specs in specs.values():
        for spec in task_specs:
            resolve_teacher(spec, cache_dir=cache_dir, token=token)
            check_teacher_files(spec)
    return specs


def check_teachers(teachers: dict[str, Any], cache_dir: str | None = None, token: str | bool | None = None) -> None:
    """What can be checked about the teachers without the base model: every spec parses (`toy:<seed>` ones
    included, with their names), and every other teacher resolves and its LoRA files are well formed."""
    from ..teachers import STUDENT, check_teacher_files, parse_teachers, resolve_teacher

    specs = parse_teachers(toy_placeholders(teachers), reserved=(STUDENT,))
    for task_specs in specs.values():
        for spec in task_specs:
            if spec.path != TOY_PLACEHOLDER:
                resolve_teacher(spec, cache_dir=cache_dir, token=token)
                check_teacher_files(spec)


def build_trainer(
    script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig, model_args: DiffusionModelConfig
) -> DiffusionOPDTrainer:
    """The `DiffusionOPDTrainer` that the `train` command runs.

    Everything that needs no model is checked first (prompt files, tasks, teacher specs and files), then the base is
    loaded and the resolution checked against it; only then are toy teachers written under `output_dir`, so that a
    failed start leaves nothing on disk."""
    from ..data import prompts_by_task
    from ..trainer.base_trainer import check_eval_strategy, resolve_student_adapter
    from ..trainer.model_config import get_student_lora_config
    from ..trainer.opd_trainer import DiffusionOPDTrainer

    train_dataset, eval_dataset = load_prompts(script_args)
    train_dataset = prompts_by_task(train_dataset)  # every prompt file is read once, here
    eval_dataset = prompts_by_task(eval_dataset) if eval_dataset is not None else None
    DiffusionOPDTrainer.check_tasks(train_dataset, script_args.teachers)
    if eval_dataset:
        DiffusionOPDTrainer.check_eval_tasks(eval_dataset, script_args.teachers)
    check_eval_strategy(training_args, eval_dataset)
    DiffusionOPDTrainer.check_task_fields(training_args, script_args.teachers)
    with training_args.main_process_first(desc="resolving the teachers"):
        check_teachers(script_args.teachers, cache_dir=model_args.cache_dir, token=training_args.hub_token)
        resolve_student_adapter(training_args.student_adapter, model_args.cache_dir, training_args.hub_token)

    check_before_loading(
        model_args.model_name_or_path,
        training_args.resolution,
        training_args.num_frames,
        [train_dataset, eval_dataset],
        pipeline_class=model_args.pipeline_class,
        revision=training_args.revision,
        cache_dir=model_args.cache_dir,
        token=training_args.hub_token,
    )
    pipeline = load_base(model_args, training_args)
    check_resolution(pipeline, training_args)
    # Toy teachers share part of their update (`shared_seed`), as teachers RL-tuned from one base do.
    teachers = materialize_toy_adapters(
        script_args.teachers,
        pipeline,
        Path(training_args.output_dir) / TOY_TEACHERS_DIR,
        std=0.1,
        rank=2,
        shared_seed=0,
        specific_scale=0.5,
    )
    with training_args.main_process_first(desc="resolving the teachers"):
        teachers = resolve_teachers(teachers, cache_dir=model_args.cache_dir, token=training_args.hub_token)
    return DiffusionOPDTrainer(
        model=pipeline,
        teachers=teachers,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_student_lora_config(model_args, pipeline),
    )


def train(
    script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig, model_args: DiffusionModelConfig
) -> DiffusionOPDTrainer:
    """The `train` command's job: build the trainer, train, save, push when asked. Returns the trainer."""
    return run_training(build_trainer(script_args, training_args, model_args), script_args, training_args)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd train ARGS`: parse, then train here or relaunch through `accelerate launch`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()
    return training_main(argv, "train", make_parser(), build_trainer, module=__name__)


if __name__ == "__main__":
    sys.exit(main())
