"""The tiny world: generator, rule-based rewards, pixel-space pipeline, pretraining (resumable) and the shipped base."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.sd3 import SD3Family
from trl_diffusion_opd.rewards import get_reward
from trl_diffusion_opd.testing import save_toy_lora
from trl_diffusion_opd.world import scenes
from trl_diffusion_opd.world.pipeline import (
    BASE_DIR,
    WorldModelConfig,
    build_world_pipeline,
    get_world_tokenizer,
    load_world_pipeline,
    sample_images,
    save_world_pipeline,
    saved_scores,
)
from trl_diffusion_opd.world.pretrain import PretrainConfig, evaluate_world, pretrain
from trl_diffusion_opd.world.rewards import detect_objects


# A transformer small enough for CPU tests (the world's default is patch 2, 6 layers, 4 x 32).
TINY = WorldModelConfig(patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16)


@pytest.fixture(scope="module")
def world_data():
    batch = scenes.scenes(600, seed=0)
    images = [Image.fromarray(a) for a in scenes.render_batch(batch)]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in batch]
    prompts = [s.prompt for s in batch]
    shuffled = [prompts[i] for i in rng.permutation(len(prompts))]
    return batch, images, noise, prompts, shuffled


# ---------------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_and_seeded():
    a, b = scenes.scenes(50, seed=3), scenes.scenes(50, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert np.array_equal(scenes.render_batch(a), scenes.render_batch(b))
    assert scenes.scene_at(3, 17).prompt == a[17].prompt  # random access: any worker, any order
    assert not np.array_equal(scenes.render_batch(a), scenes.render_batch(scenes.scenes(50, seed=4)))
    image = a[0].render()
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_prompts_metadata_and_grammar():
    prompts = scenes.all_prompts()
    assert len(prompts) == len(set(prompts)) == 216
    for prompt in prompts:
        scenes.parse_prompt(prompt)  # every generated prompt is in the grammar
    spec = scenes.parse_prompt("Three blue squares")
    assert spec.family == "counting" and spec.requirements[0] == scenes.Requirement("blue", "square", 3, None)
    assert scenes.parse_prompt("a green triangle on the left").requirements[0].position == "left"
    assert scenes.parse_prompt("the letter k").letter == "K"
    with pytest.raises(ValueError, match="not a world prompt"):
        scenes.parse_prompt("a purple dog")
    for task, families in scenes.TASK_FAMILIES.items():
        rows = scenes.task_prompts(task, 40, seed=1)
        assert {row["task"] for row in rows} == {task} and {row["family"] for row in rows} <= set(families)
    row = scenes.task_prompts("composition", 1)[0]
    assert {"prompt", "task", "family", "requirements", "objects"} <= set(row)


def test_scene_objects_are_where_the_prompt_says(world_data):
    batch, images, *_ = world_data
    for scene, image in zip(batch[:200], images[:200], strict=True):
        found = detect_objects(image)
        assert len(found) == len(scene.objects)
        assert sorted((o["color"], o["shape"]) for o in found) == sorted((o.color, o.shape) for o in scene.objects)


# ---------------------------------------------------------------------------------------------- rewards
def _mean(reward, images, prompts):
    return float(np.nanmean(reward(images, prompts)))


def test_composition_reward_ground_truth_noise_and_shuffled(world_data):
    _, images, noise, prompts, shuffled = world_data
    soft, binary = get_reward("world_composition"), get_reward("world_composition", mode="binary")
    assert _mean(soft, images, prompts) >= 0.98
    assert _mean(binary, images, prompts) >= 0.95
    assert _mean(soft, noise, prompts) < 0.1  # measured 0.02
    assert _mean(binary, noise, prompts) < 0.02
    assert _mean(soft, images, shuffled) < 0.3  # measured 0.19: a matching colour now and then
    assert _mean(binary, images, shuffled) < 0.05  # measured 0.015
    letter = scenes.scenes(1, seed=0, families=("letter",))[0]
    assert math.isnan(soft([Image.fromarray(letter.render())], [letter.prompt])[0])
    with pytest.raises(ValueError, match="mode"):
        get_reward("world_composition", mode="sometimes")


def test_composition_reward_checks_binding_and_position():
    reward = get_reward("world_composition", mode="binary")
    scene = scenes.Scene(
        "a red circle and a blue square",
        "binding",
        [scenes.WorldObject("circle", "red", 8, 8, 5), scenes.WorldObject("square", "blue", 24, 24, 5)],
    )
    image = Image.fromarray(scene.render())
    assert reward([image], ["a red circle and a blue square"]) == [1.0]
    assert reward([image], ["a blue circle and a red square"]) == [0.0]  # colours bound to the wrong shapes
    assert reward([image], ["a red circle on the left"]) == [0.0]  # a blue square too many
    soft = get_reward("world_composition")
    assert 0.0 < soft([image], ["a blue circle and a red square"])[0] < 1.0


def test_letters_reward_ground_truth_noise_and_shuffled(world_data):
    batch = scenes.scenes(240, seed=5, families=("letter",))
    images = [Image.fromarray(s.render()) for s in batch]
    prompts = [s.prompt for s in batch]
    rng = np.random.default_rng(1)
    shuffled = [prompts[i] for i in rng.permutation(len(prompts))]
    noise = world_data[2][:240]
    chance = 1 / len(scenes.LETTERS)
    grey = Image.new("RGB", (32, 32), scenes.BACKGROUND)
    # Recognition alone: the probability that the prompted letter is the one read.
    recognition = get_reward("world_letters", fidelity=False)
    assert _mean(recognition, images, prompts) >= 0.95  # measured 0.985
    assert abs(_mean(recognition, noise, prompts) - chance) < 0.03  # measured 0.082
    assert abs(_mean(recognition, images, shuffled) - chance) < 0.06  # wrong letter ~0, right one by chance
    assert recognition([grey], ["the letter K"])[0] == pytest.approx(chance, abs=1e-6)
    # The default score: recognition x the prompted glyph's correlation (exactly 1 on a ground-truth glyph).
    reward = get_reward("world_letters")
    assert reward(images, prompts) == pytest.approx(recognition(images, prompts), abs=1e-5)
    assert _mean(reward, noise, prompts) < 0.02  # noise is neither read as the letter nor drawn like it
    assert abs(_mean(reward, images, shuffled) - chance) < 0.06
    assert reward([grey], ["the letter K"])[0] == 0.0
    # A smeared glyph (3 x 3 box blur) is still read as the prompted letter but loses fidelity.
    crisp = np.asarray(images[0]).astype(np.float32)
    smeared = crisp.copy()
    for axis in (0, 1):
        smeared = (np.roll(smeared, 1, axis) + smeared + np.roll(smeared, -1, axis)) / 3
    smeared_image = Image.fromarray(smeared.round().astype(np.uint8))
    assert reward([smeared_image], prompts[:1])[0] < reward(images[:1], prompts[:1])[0] - 0.05  # 0.89 vs 0.99
    assert recognition([smeared_image], prompts[:1])[0] > 0.5
    assert math.isnan(reward([grey], ["a red circle"])[0])


def test_aesthetic_reward_ground_truth_noise_blocks_and_blur(world_data):
    _, images, noise, prompts, _ = world_data
    reward = get_reward("world_aesthetic")
    arrays = [np.asarray(image) for image in images]
    blocky = [Image.fromarray(np.kron(a[::4, ::4], np.ones((4, 4, 1), np.uint8))) for a in arrays]
    pooled = [
        Image.fromarray(np.kron(a.reshape(8, 4, 8, 4, 3).mean((1, 3)).astype(np.uint8), np.ones((4, 4, 1), np.uint8)))
        for a in arrays
    ]
    from PIL import ImageFilter

    blurred = [image.filter(ImageFilter.GaussianBlur(1)) for image in images]
    assert _mean(reward, images, prompts) >= 0.95  # measured 0.976 (squares on the 4-pixel grid look blocky)
    assert _mean(reward, noise, prompts) < 0.02  # measured 0.0
    assert _mean(reward, blocky, prompts) < 0.05  # measured 0.0
    assert _mean(reward, pooled, prompts) < 0.05  # measured 0.0
    assert _mean(reward, blurred, prompts) < 0.5  # measured 0.38
    assert reward([Image.new("RGB", (32, 32), scenes.BACKGROUND)])[0] == 0.0  # nothing drawn


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def tiny_world():
    return build_world_pipeline(TINY)


def test_task_reward_routes_each_row_to_its_task_reward():
    rows, images = [], []
    for task in ("composition", "letters", "aesthetic"):
        task_scenes = scenes.task_scenes(task, 6, seed=3)
        rows += [scene.metadata() | {"task": task} for scene in task_scenes]
        images += [scenes.render(scene) for scene in task_scenes]
    prompts = [row["prompt"] for row in rows]
    routed = get_reward("world_task")(images, prompts, rows)
    for task, name in (
        ("composition", "world_composition"),
        ("letters", "world_letters"),
        ("aesthetic", "world_aesthetic"),
    ):
        index = [i for i, row in enumerate(rows) if row["task"] == task]
        direct = get_reward(name)([images[i] for i in index], [prompts[i] for i in index], [rows[i] for i in index])
        assert [routed[i] for i in index] == direct
    with pytest.raises(ValueError, match="unknown task"):
        get_reward("world_task")(images[:1], prompts[:1], [{"task": "ocr"}])


def test_tokenizer_has_one_token_per_world_word():
    tokenizer = get_world_tokenizer()
    for word in scenes.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert max(len(tokenizer(p).input_ids) for p in scenes.all_prompts()) <= tokenizer.model_max_length


def test_identity_vae_and_family(tiny_world):
    pipe = tiny_world
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.sample()
        decoded = pipe.vae.decode(latents).sample
    assert (latents - x).abs().max() <= 1e-5 and (decoded - x).abs().max() <= 1e-5
    family = get_family(pipe, max_sequence_length=1)
    assert isinstance(family, SD3Family) and family.vae_scale_factor == 1
    assert family.init_latents(2, 32).shape == (2, 3, 32, 32)
    assert family.encode_prompts(["a red circle"])["prompt_embeds"].shape == (1, 16 + 1, 2 * TINY.text_hidden_size)
    image = scenes.scenes(1)[0].render()
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert np.array_equal(np.asarray(family.decode(pixels, 32)[0]), image)  # decode of the pixels is the image


def test_sampler_matches_diffusers_pipeline(tiny_world):
    pipe = tiny_world
    prompts = ["a red circle", "the letter K"]
    ours = sample_images(pipe, prompts, num_inference_steps=3, seed=0)
    latents = get_family(pipe).init_latents(2, 32, torch.Generator().manual_seed(0))
    theirs = pipe(
        prompts, num_inference_steps=3, height=32, width=32, guidance_scale=1.0, max_sequence_length=1, latents=latents
    ).images
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_save_and_load_fp16(tiny_world, tmp_path):
    save_world_pipeline(tiny_world, tmp_path / "world")
    loaded = load_world_pipeline(tmp_path / "world")
    assert loaded.world_config == TINY and loaded.transformer.dtype == torch.float32
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (loaded.vae.decode(loaded.vae.encode(x).latent_dist.mode()).sample - x).abs().max() <= 1e-5
    with pytest.raises(FileNotFoundError, match="world pretrain"):
        load_world_pipeline(tmp_path / "missing")


def test_diffusion_opd_trainer_runs_on_the_world(tmp_path):
    teacher_pipe = build_world_pipeline(TINY)
    teachers = {
        "composition": str(save_toy_lora(teacher_pipe, tmp_path / "t_comp", seed=1, rank=2)),
        "letters": str(save_toy_lora(teacher_pipe, tmp_path / "t_letters", seed=2, rank=2)),
    }
    config = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        resolution=32,
        num_inference_steps=3,
        per_device_train_batch_size=2,
        max_sequence_length=1,
        guidance_scale=1.0,
        learning_rate=1e-3,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    dataset = {task: scenes.task_prompts(task, 4) for task in teachers}
    trainer = DiffusionOPDTrainer(build_world_pipeline(TINY), teachers, args=config, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    images = trainer.generate(["a red circle"])
    assert images[0].size == (32, 32)
    assert len(get_reward("world_composition")(images, ["a red circle"])) == 1


# ---------------------------------------------------------------------------------------------- pretraining
def _pretrain_config(folder, **kwargs):
    values = {
        "output_dir": str(folder),
        "steps": 4,
        "batch_size": 4,
        "warmup_steps": 2,
        "save_every": 1,
        "log_every": 1,
        "eval_images": 0,
        "progress": False,
        "model": TINY,
    }
    values.update(kwargs)
    return PretrainConfig(**values)


def test_pretrain_resumes_exactly(tmp_path):
    straight = pretrain(_pretrain_config(tmp_path / "straight"))

    class Killed(Exception):
        pass

    def kill_at_two(step, loss):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        pretrain(_pretrain_config(tmp_path / "resumed"), on_step=kill_at_two)
    assert torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    resumed = pretrain(_pretrain_config(tmp_path / "resumed"))
    state_a = torch.load(tmp_path / "straight" / "checkpoint" / "state.pt", weights_only=True)
    state_b = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=True)
    assert state_a["step"] == state_b["step"] == 4
    for key, value in state_a["transformer"].items():
        assert torch.equal(value, state_b["transformer"][key]), key
    assert state_a["ema"]["optimization_step"] == state_b["ema"]["optimization_step"] == 4
    for a, b in zip(state_a["ema"]["shadow_params"], state_b["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert (straight / "model_index.json").is_file() and (resumed / "world_scores.json").is_file()
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged][-2:] == [3, 4]


def test_world_command_pretrain_and_eval(tmp_path, capsys):
    from trl_diffusion_opd.world.cli import world_command

    argv = ["pretrain", "--output_dir", str(tmp_path), "--steps", "2", "--batch_size", "2", "--eval_images", "2"]
    argv += ["--patch_size", "4", "--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8"]
    argv += ["--text_hidden_size", "16", "--no_progress"]
    assert world_command(argv) == 0
    scores = json.loads((tmp_path / "pipeline" / "world_scores.json").read_text())
    assert scores["step"] == 2 and {"composition", "composition_binary", "letters", "aesthetic"} <= set(scores)
    assert world_command(["eval", "--model", str(tmp_path / "pipeline"), "--num_images", "2"]) == 0
    assert '"letters"' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- shipped base
@pytest.mark.skipif(not (BASE_DIR / "model_index.json").is_file(), reason="the pretrained world base is not shipped")
def test_shipped_base_loads_offline_and_scores_in_band(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_world_pipeline()
    assert isinstance(get_family(pipe), SD3Family)
    recorded = saved_scores()
    assert recorded is not None
    scores = evaluate_world(pipe, num_images=32, num_inference_steps=10)
    # Better than chance (composition 0.02 on noise, letters 0.01, aesthetic 0.0), short of perfect; the recorded
    # scores (256 images per task) are 0.69, 0.61 and 0.55: inside the band 0.2-0.7 that leaves RL room to improve.
    bands = {"composition": (0.4, 0.85), "letters": (0.35, 0.85), "aesthetic": (0.25, 0.85)}
    for task, (low, high) in bands.items():
        assert 0.2 <= recorded[task] <= 0.7, (task, recorded[task])
        assert low <= scores[task] <= high, (task, scores[task])
        assert abs(scores[task] - recorded[task]) < 0.15, (task, scores[task], recorded[task])  # 32 images here
