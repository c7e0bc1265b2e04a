"""The shipped Stage-1 world teachers: they load (as DiffusionOPD teachers and through diffusers), beat the base on
their own reward on a small held-out set, and their recipe trains end to end."""

import json

import pytest
import torch

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.rewards import get_reward, nanmean
from trl_diffusion_opd.world.pipeline import load_world_pipeline, sample_images
from trl_diffusion_opd.world.teachers import (
    TASK_REWARDS,
    TASKS,
    TEACHERS_DIR,
    heldout_prompts,
    load_teacher_pipeline,
    shipped_teachers,
    teacher_folder,
    train_world_teacher,
)


# Held-out set of the margin test: 24 prompts per task (seed 4321, also the initial noise), 10 Euler steps, CFG 1.
NUM_HELDOUT = 24
HELDOUT_SEED = 4321
# Minimum teacher - base gain on the task's own reward at that size. Measured (sampling is deterministic on the CPU):
# composition 0.644 -> 0.716 (+0.072), letters 0.617 -> 0.739 (+0.122), aesthetic 0.568 -> 0.663 (+0.094); the
# margins leave room for numerical drift across torch / diffusers versions, not for a teacher that stopped helping.
MIN_GAIN = {"composition": 0.04, "letters": 0.08, "aesthetic": 0.06}


@pytest.fixture(autouse=True)
def one_thread():
    # The world's transformer is fastest on one thread, and far less sensitive to other processes on the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _own_reward(pipe, task):
    prompts = heldout_prompts(task, NUM_HELDOUT, HELDOUT_SEED)
    images = sample_images(pipe, prompts, num_inference_steps=10, guidance_scale=1.0, seed=HELDOUT_SEED)
    return nanmean(get_reward(TASK_REWARDS[task])(images, prompts))


def test_index_lists_every_task_with_its_files():
    index = shipped_teachers()
    assert set(index) == set(TASKS)
    for task, entry in index.items():
        folder = teacher_folder(task)
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "README.md").is_file()
        assert entry["reward"] == TASK_REWARDS[task]
        scores = json.loads((folder / "scores.json").read_text())
        # scores.json holds all three rewards for base and teacher, and the teacher wins on its own one.
        assert set(TASKS) <= set(scores["base"]) and set(TASKS) <= set(scores["teacher"])
        assert scores["teacher"][task] > scores["base"][task]
        # Small fixtures: a rank-8 LoRA on the attention projections is ~0.4 MB.
        assert (folder / "pytorch_lora_weights.safetensors").stat().st_size < 1_000_000


def test_write_index_keeps_the_other_teachers(tmp_path):
    from dataclasses import asdict

    from trl_diffusion_opd.world.teachers import RECIPES, write_index

    def record(value):
        scores = {"base": {"letters": value}, "teacher": {"letters": value + 0.1}, "delta": {"letters": 0.1}}
        return {**scores, "settings": {"num_images": 1}, "training": {"recipe": asdict(RECIPES["letters"])}}

    for task in TASKS:
        (tmp_path / task).mkdir()
    write_index(tmp_path, {"aesthetic": record(0.1), "composition": record(0.2)})
    index = write_index(tmp_path, {"letters": record(0.5)})  # re-training one teacher keeps the others
    assert list(index) == list(TASKS) == list(json.loads((tmp_path / "index.json").read_text()))
    assert [index[task]["scores"]["base"]["letters"] for task in TASKS] == [0.2, 0.5, 0.1]
    (tmp_path / "aesthetic").rmdir()  # an entry whose folder is gone is dropped
    assert list(write_index(tmp_path, {"letters": record(0.6)})) == ["composition", "letters"]


def test_teachers_load_as_diffusion_opd_teachers(tmp_path):
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=32,
        num_inference_steps=2,
        per_device_train_batch_size=1,
        max_sequence_length=1,
        report_to="none",
        save_strategy="no",
        ema=False,
        disable_tqdm=True,
        guidance_scale=1.0,
        teacher_guidance_scale=1.0,
    )
    trainer = DiffusionOPDTrainer(
        load_world_pipeline(),
        {task: str(TEACHERS_DIR / task) for task in TASKS},
        args=args,
        train_dataset={task: heldout_prompts(task, 4) for task in TASKS},
    )
    prompts = ["a red circle", "the letter K"]
    base = torch.stack([torch.from_numpy(_array(im)) for im in trainer.generate(prompts, adapter=None, seed=3)])
    for task in TASKS:
        images = trainer.generate(prompts, adapter=task, seed=3)
        teacher = torch.stack([torch.from_numpy(_array(im)) for im in images])
        # Same noise, different weights: each teacher's adapter is really active.
        assert (teacher - base).abs().float().mean() > 0.5, task


def _array(image):
    import numpy as np

    return np.asarray(image, dtype=np.int16)


def test_teachers_load_with_diffusers_load_lora_weights():
    pipe = load_world_pipeline()
    for task in TASKS:
        pipe.load_lora_weights(str(teacher_folder(task)), adapter_name=task)
    assert set(TASKS) <= set(pipe.get_list_adapters()["transformer"])
    # The plain diffusers pipeline call works with a teacher active (max_sequence_length=1: the world has no T5).
    pipe.set_adapters("letters")
    image = pipe(
        "the letter K",
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=1,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize("task", TASKS)
def test_teacher_beats_base_on_its_own_reward(task):
    base = _own_reward(load_teacher_pipeline(None), task)
    teacher = _own_reward(load_teacher_pipeline(teacher_folder(task)), task)
    assert teacher - base > MIN_GAIN[task], (task, base, teacher)


def test_train_world_teacher_smoke(tmp_path):
    # The real recipe of each trainer kind (NFT for composition, the recipe's for letters), on a tiny budget.
    for task in ("composition", "letters"):
        folder = train_world_teacher(
            task,
            tmp_path / task,
            max_steps=1,
            progress=False,
            num_generations=2,
            prompts_per_step=1,
            num_inference_steps=2,
        )
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "README.md").is_file()
        info = json.loads((folder / "training.json").read_text())
        assert info["recipe"]["max_steps"] == 1 and info["task"] == task
        pipe = load_teacher_pipeline(folder)
        assert "default_0" in pipe.get_list_adapters()["transformer"]
