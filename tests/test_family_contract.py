"""The contract every model family keeps, checked on each tiny pipeline with its own settings (`tests/helpers.py`, one
row per family): the trainer's rollout at CFG > 1 and a non-square size is its pipeline's `__call__`, the KL between an
adapter and itself is 0, distillation lowers the KL to each teacher (each family's measured bar) and trains only the
student, the saved student reloads with diffusers' `load_lora_weights`, and the model card names the base and tags.
Editing rows (FLUX.1 Kontext, FLUX.2 [klein] with `image=`, Qwen-Image-Edit and -Edit-Plus) run the same checks with an
input image per prompt row, and the trained student's velocity must depend on that image. What is a family's own
(Z-Image's CFG truncation, Qwen-Image's norm rescale, Wan's expert switch, Kontext's preferred resolutions, ...) is
tested in that family's file."""

import pytest
import torch
from huggingface_hub import ModelCard

from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.lora_io import expert_weight_name

from helpers import ROWS, VARIANTS, changed, offline_hub, quick_start, snapshot, split_rows


def _ids(rows):
    return [row.name for row in rows]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with offline_hub():
        yield


@pytest.fixture(scope="module", params=ROWS, ids=_ids(ROWS))
def family(request):
    """The row under test (module-scoped, so that its teachers and distilled student are built once)."""
    torch.set_num_threads(1)  # conftest's per-test setting runs after module-scoped fixtures
    return request.param


@pytest.fixture(scope="module")
def teachers(family, tmp_path_factory) -> dict[str, str]:
    """The row's toy teachers, one per task."""
    return family.save_teachers(family.build(seed=0), tmp_path_factory.mktemp(f"{family.name}-teachers"))


@pytest.fixture(scope="module")
def distilled(family, teachers, tmp_path_factory):
    """The row's distillation for each of its seeds: `(trainer of the first seed, params before training, KLs)`, the
    KLs a list of `(before, after)` per seed, each `{task: kl}` on the held-out prompts."""
    tmp = tmp_path_factory.mktemp(family.name)
    first, before, kls = None, None, []
    for seed in family.seeds:
        pipe = family.build(seed=0)
        pipe.register_to_config(_name_or_path=family.base)  # as `from_pretrained(base)` records it
        trainer = family.trainer(tmp / f"seed-{seed}", pipe, teachers, seed=seed, **family.distil)
        if first is None:
            first, before = trainer, snapshot(trainer.model)
        kl_before = trainer.compute_teacher_kl(family.held_out, use_ema=False)
        trainer.train()
        kls.append((kl_before, trainer.compute_teacher_kl(family.held_out, use_ema=False)))
    return first, before, kls


@pytest.mark.parametrize("family", ROWS + VARIANTS, ids=_ids(ROWS + VARIANTS))
def test_rollout_reproduces_the_pipeline_at_cfg_and_a_non_square_size(family, tmp_path):
    """The trainer's ODE rollout (noise level 0) at CFG > 1 and height != width gives the latents of the pipeline's
    `__call__` at that height and width from the same noise, with the student adapter active: latent grid and
    layout, prompt encoding, ids, schedule (shifted by the image's token count where the family does), timestep
    convention and guidance; guidance changes the result, and images come out height x width."""
    # A student LoRA that is not zero, so that the pipeline (which runs the active student adapter) is not the base.
    student = {"r": 4, "lora_alpha": 4, "init_lora_weights": False}
    size = {"resolution": list(family.size), "num_inference_steps": 3}
    trainer = family.trainer(tmp_path, student=student, **size, **family.guidance)
    prompts = list(family.prompts)
    assert trainer.args.resolution == family.size
    cond = family.cond(trainer, prompts)
    states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
    # Every family's latents end in (latent height, latent width): 2 : 3 here, the image's aspect.
    assert states.shape[-2] * 3 == states.shape[-1] * 2
    with torch.no_grad():
        expected, layout = family.pipeline_latents(trainer, prompts, states[0], family.guidance["guidance_scale"])
    torch.testing.assert_close(layout(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1
    unguided = trainer.rollout(cond, torch.Generator().manual_seed(0), guidance_scale=family.unguided)["states"]
    torch.testing.assert_close(unguided[0], states[0])
    # measured 0.034 (FLUX.2 klein, whose tiny blocks barely move the velocity) to 0.75
    assert (unguided[-1] - states[-1]).abs().max() > 1e-2, "guidance did not change the rollout"

    first, images = split_rows(prompts[:1])
    samples = trainer.generate(first, adapter=None, num_inference_steps=2, images=images)
    image = samples[0][0] if isinstance(samples[0], list) else samples[0]  # a video's first frame
    assert image.size == (family.size[1], family.size[0])  # PIL: (width, height)


def test_kl_is_zero_between_an_adapter_and_itself(family, teachers, tmp_path):
    """A student started from a teacher's weights has KL 0 to it at every step, and a clearly positive one to the
    other teacher on the same rollouts."""
    same = family.same_task or next(iter(family.train))
    (other,) = set(family.train) - {same}
    settings = {"student_adapter": teachers[same], **family.guidance, **family.same_args}
    trainer = family.trainer(tmp_path, teachers=teachers, **settings)
    rows = [row if isinstance(row, dict) else {"prompt": row} for row in family.held_out[same]]
    with torch.no_grad():
        _, kl_same = trainer.task_loss(trainer.model, same, rows, torch.Generator().manual_seed(0), backward=False)
        _, kl_other = trainer.task_loss(trainer.model, other, rows, torch.Generator().manual_seed(0), backward=False)
    assert kl_same.shape == (trainer.args.num_train_timesteps,)
    assert kl_same.abs().max().item() <= family.same_tolerance, kl_same
    assert kl_other.min().item() > family.other_floor, kl_other


def test_distillation_lowers_the_kl_to_each_teacher_and_trains_only_the_student(family, distilled):
    trainer, before, kls = distilled
    reductions = []
    for kl_before, kl_after in kls:
        assert kl_before.keys() == kl_after.keys() == set(family.train)
        for task in kl_before:
            assert kl_before[task] > family.kl_floor, f"teacher '{task}' equals the base: nothing to distil"
        reductions.append({task: 1 - kl_after[task] / kl_before[task] for task in kl_before})
    for task in family.train:
        worst = min(r[task] for r in reductions)
        assert worst >= family.min_reduction, f"KL to '{task}' fell by {worst:.1%} only (per seed: {reductions})"
    # Only the student trained (base and teacher adapters are frozen), and every LoRA-B of it that a loss reaches.
    moved = changed(trainer.model, before)
    student = {n for n, _ in trainer.model.named_parameters() if ".student." in n}
    assert moved and moved <= student
    assert {n for n in student if ".lora_B." in n} - moved == family.frozen


def test_saved_student_reloads_with_load_lora_weights(family, distilled, tmp_path):
    """The saved student (a file per expert) loads into a fresh pipeline with diffusers' `load_lora_weights`, as the
    model card says, and gives the trained student's velocities on every expert."""
    trainer, *_ = distilled
    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    fresh = family.build(seed=0)
    args = trainer.args
    video = {"num_frames": args.num_frames} if args.num_frames else {}
    family_ = get_family(fresh, args.family_kwargs, max_sequence_length=args.max_sequence_length, **video)
    assert type(family_) is family.family_class
    rows = [row for rows in family.held_out.values() for row in rows][:4]
    rows = [rows[i] for i in trainer.prompt_cache.groups(*split_rows(rows))[0]]  # references of one size
    cond, negative = family.cond(trainer, rows), trainer._negative(len(rows))
    x = family_.init_latents(len(rows), args.resolution, torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.2])[: len(rows)]  # Wan 2.2: two rows on each expert
    guidance = family.guidance

    def velocity(fam):
        return fam.velocity(fam.denoiser, x, sigma, cond, negative_cond=negative, **guidance)

    with torch.no_grad():
        base = velocity(family_)
        for expert in family_.experts:
            further = {} if expert == "transformer" else {"weight_name": expert_weight_name(expert)}
            fresh.load_lora_weights(str(folder), **further, **({f"load_into_{expert}": True} if further else {}))
        reloaded = velocity(family_)
        student = velocity(trainer.family)
    experts = family_.expert_index(sigma)
    for index in range(len(family_.experts)):
        rows = experts == index
        assert (student[rows] - base[rows]).abs().max() > family.student_moves, "the student equals the base"
    assert (reloaded - student).abs().max() <= 1e-5
    several = len(family_.experts) > 1
    adapted = {
        (f"{component}." if several else "") + n.split(".lora_A.")[0]
        for component, module in family_.experts.items()
        for n, _ in module.named_parameters()
        if ".lora_A." in n
    }
    assert adapted == {n.split(".lora_A.")[0] for n in trainer.student_state_dict() if ".lora_A." in n}
    assert family.adapted(adapted), sorted(adapted)


def test_student_velocity_depends_on_the_input_image(family, distilled):
    """An editing row's trained student velocity changes when its input image is replaced by another of the same size
    (the first sampler row's, by the second's)."""
    first, second = family.prompts[:2]
    if not isinstance(first, dict) or "image" not in first:
        pytest.skip("a text-to-image row: no input image")
    assert first["image"] is not second["image"]
    trainer, *_ = distilled
    args = trainer.args
    x = trainer.family.init_latents(1, args.resolution, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        own, swapped = (
            trainer.family.velocity(
                trainer.pipeline.transformer,
                x,
                sigma,
                family.cond(trainer, [row]),
                negative_cond=trainer._negative(1),
                **family.guidance,
            )
            for row in (first, {**first, "image": second["image"]})
        )
    assert (own - swapped).abs().max() > family.image_moves


def test_model_card_names_the_base_and_tags(family, distilled):
    trainer, *_ = distilled
    trainer.create_model_card()
    card = ModelCard.load(f"{trainer.args.output_dir}/README.md")
    data = card.data.to_dict()
    assert data["base_model"] == family.base and data["base_model_relation"] == "adapter"
    assert data.get("license") == family.license
    assert data["pipeline_tag"] == family.pipeline_tag
    # the task tag follows the family's task (a video family's card is not tagged text-to-image)
    fixed = [family.pipeline_tag, "diffusers", "lora", "trl", "diffusion-opd", family.tag]
    assert sorted(data["tags"]) == sorted(fixed + list(family.train))
    assert f'DiffusionPipeline.from_pretrained("{family.base}"' in card.text
    # Each task's kind (its rows carry input images or not, named for the family's medium); the teachers' table names
    # it once a task takes input images.
    video = family.pipeline_tag.endswith("-to-video")
    text, image = ("text-to-video", "image-to-video") if video else ("text-to-image", "editing")
    kinds = {task: image if split_rows(rows)[1] is not None else text for task, rows in family.train.items()}
    assert trainer.task_kinds() == kinds
    for task, kind in kinds.items():
        assert (f"| {task} ({kind}) |" in card.text) == (image in kinds.values()), (task, kind)
    code = quick_start(card.text)
    compile(code, "quick_start", "exec")
    for snippet in family.card_code:
        assert snippet in code, (snippet, code)
    for snippet in family.card_code_absent:
        assert snippet not in code, (snippet, code)
