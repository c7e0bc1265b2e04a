"""Per-task options of DiffusionOPD: `task_prompt_templates` (the student sees a task's prompt through a template,
its teachers see it as written) and `task_timestep_fraction` (a task is supervised on its first steps only)."""

import numpy as np
import pytest
import torch

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


PROMPTS = ["a red cube", "two green cones", "a blue ball on a box"]


def _args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 4,
        "per_device_train_batch_size": 3,
        "max_sequence_length": 1,
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "t"
    save_toy_lora(get_tiny_sd3_pipeline(with_t5=False), folder, seed=1, std=0.2, rank=2)
    return str(folder)


def _kl(tmp_path, teacher, templates):
    # The student starts as the teacher itself: every difference in the KL comes from the prompt it sees.
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"same": teacher, "tagged": teacher},
        args=_args(tmp_path, student_adapter=teacher, task_prompt_templates=templates),
        train_dataset={"same": PROMPTS, "tagged": PROMPTS},
    )
    return trainer, trainer.compute_teacher_kl({"same": PROMPTS, "tagged": PROMPTS}, seed=0)


def test_only_the_student_sees_the_template(tmp_path, teacher):
    _, kl = _kl(tmp_path / "plain", teacher, None)
    assert kl == {"same": 0.0, "tagged": 0.0}
    trainer, kl = _kl(tmp_path / "tagged", teacher, '{"tagged": "{prompt}, zz"}')  # a JSON string, as on the CLI
    assert kl["same"] == 0.0  # a task without a template is untouched
    assert kl["tagged"] > 1e-6  # same weights, other prompt for the student only
    assert trainer.student_prompts("tagged", PROMPTS) == [f"{p}, zz" for p in PROMPTS]
    assert trainer.student_prompts("same", PROMPTS) == PROMPTS


def test_the_card_names_the_template(tmp_path, teacher):
    trainer, _ = _kl(tmp_path, teacher, {"tagged": "{prompt}, zz"})
    trainer.create_model_card(output_dir=str(tmp_path / "card"))
    card = (tmp_path / "card" / "README.md").read_text()
    assert "student prompt for tagged" in card and "`{prompt}, zz`" in card


@pytest.mark.parametrize(
    "templates, message",
    [
        ({"a": "no placeholder"}, "must be a string containing '{prompt}'"),
        ({"a": 3}, "must be a string containing '{prompt}'"),
        ({"a": "{prompt} {style}"}, "has a placeholder other than '{prompt}'"),
    ],
)
def test_bad_templates_fail_in_the_config(tmp_path, templates, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        _args(tmp_path, task_prompt_templates=templates)


def test_a_template_for_a_task_without_teacher_fails(tmp_path, teacher):
    with pytest.raises(
        ValueError, match=r"`task_prompt_templates` names task\(s\) \['other'\], which have no teacher"
    ):
        DiffusionOPDTrainer(
            get_tiny_sd3_pipeline(with_t5=False),
            {"same": teacher},
            args=_args(tmp_path, task_prompt_templates={"other": "{prompt}!"}),
            train_dataset={"same": PROMPTS},
        )


def test_evaluation_samples_a_row_through_its_template(teacher):
    from trl_diffusion_opd.evaluation import evaluate_models

    pipe = get_tiny_sd3_pipeline(with_t5=False)
    prompts_seen = {}

    def record(images_, prompts, metadata):
        return [float(np.asarray(image, dtype="float64").mean()) for image in images_]

    original = pipe.__class__.__call__

    def spy(self, *args, **kwargs):
        prompts_seen.setdefault(len(prompts_seen), list(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    pipe.__class__.__call__ = spy
    try:
        result = evaluate_models(
            pipe,
            prompts={"bright": PROMPTS},
            adapters={
                "plain": teacher,
                "identity": {"path": teacher, "prompt_templates": {"bright": "{prompt}"}},
                "tagged": {"path": teacher, "prompt_templates": {"bright": "{prompt}, zz"}},
            },
            rewards={"bright": record},
            normalization={"bright": [0, 255]},
            include_base=False,
            progress=False,
            batch_size=3,
            num_inference_steps=3,
            resolution=32,
            max_sequence_length=8,
        )
    finally:
        pipe.__class__.__call__ = original
    assert prompts_seen == {0: PROMPTS, 1: PROMPTS, 2: [f"{p}, zz" for p in PROMPTS]}
    assert result.per_image["identity"]["bright"] == result.per_image["plain"]["bright"]
    assert result.per_image["tagged"]["bright"] != result.per_image["plain"]["bright"]


def test_task_timestep_fraction_trains_only_the_first_steps_of_that_task(tmp_path, teacher):
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"early": teacher, "all": teacher},
        args=_args(tmp_path, task_timestep_fraction='{"early": 0.5}', max_steps=1, logging_steps=1),
        train_dataset={"early": PROMPTS, "all": PROMPTS},
    )
    assert trainer.args.train_timesteps_for("early") == 2 and trainer.args.train_timesteps_for("all") == 3
    calls = []
    velocity = trainer.family.velocity

    def counted(transformer, x, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return velocity(transformer, x, *args, **kwargs)

    trainer.family.velocity = counted
    try:
        _, kl = trainer.task_loss(trainer.model, "early", [{"prompt": p} for p in PROMPTS], torch.Generator(), True)
    finally:
        trainer.family.velocity = velocity
    assert kl.shape == (2,) and bool((kl > 0).all())
    assert calls.count(True) == 2  # the fused rollout trains steps 0 and 1 and samples nothing after them
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "kl_step/2" in h)
    # step 2 is trained by the "all" task alone: the round still logs a (positive, finite) KL for it
    assert 0 < logged["kl_step/2"] < float("inf") and all(f"kl_step/{j}" in logged for j in range(3))


@pytest.mark.parametrize("fraction", [0, 1.5, "half"])
def test_bad_task_timestep_fraction_fails_in_the_config(tmp_path, fraction):
    with pytest.raises(ValueError, match=r"task_timestep_fraction\['a'\]"):
        _args(tmp_path, task_timestep_fraction={"a": fraction})
