"""What Wan image-to-video adds to the family contract (tests/test_family_contract.py runs the rollout = `__call__`,
KL 0, distillation, reload and card checks on `wan22_i2v`, `wan21_i2v` and `wan22_ti2v_i2v`), on the tiny
`WanImageToVideoPipeline`s at non-square sizes: TI2V's conditioned latent frame is outside what the sampler moves (so
outside the KL), the output depends on the frame, the decoded TI2V video starts with it, eval samples with it and shows
it first, bad rows fail in one line before the base loads, `pipeline_class`, and DDP with two experts."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from PIL import Image

from trl_diffusion_opd import DiffusionModelConfig, DiffusionOPDConfig, DiffusionOPDTrainer, cli, registry, transition
from trl_diffusion_opd.evaluation import generate_images
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.wan import WanFamily
from trl_diffusion_opd.scripts import eval as eval_script
from trl_diffusion_opd.testing import (
    TINY_WAN_FRAMES,
    TINY_WAN_I2V_SIZE,
    TINY_WAN_TI2V_I2V_SIZE,
    get_tiny_wan_i2v_pipeline,
)

from helpers import I2V_FRAMES as FRAMES
from helpers import I2V_ROWS as ROWS
from helpers import WAN22_I2V


TARGETS = WanFamily.default_lora_targets
STEPS = 4
LOW_2 = "pytorch_lora_weights_transformer_2.safetensors"
VARIANTS = {
    "wan21": ({}, TINY_WAN_I2V_SIZE, ("transformer",)),
    "wan22": ({"two_experts": True}, TINY_WAN_I2V_SIZE, ("transformer", "transformer_2")),
    "ti2v": ({"ti2v": True}, TINY_WAN_TI2V_I2V_SIZE, ("transformer",)),
}


def _args(output_dir, size=TINY_WAN_I2V_SIZE, **kwargs) -> DiffusionOPDConfig:
    """The family contract's `wan22_i2v` settings (tests/helpers.py) at `size`, seed 0, over `kwargs`."""
    return WAN22_I2V.config(output_dir, **{"resolution": list(size), "seed": 0, **kwargs})


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)


def _trainer(tmp_path, variant: str, **kwargs):
    """A trainer on the variant's tiny pipeline with the family contract's toy teacher for `motion`."""
    build, size, _ = VARIANTS[variant]
    pipe = get_tiny_wan_i2v_pipeline(seed=0, **build)
    teachers = WAN22_I2V.save_teachers(pipe, tmp_path / "teachers", tasks=1)
    kwargs.setdefault("peft_config", _student_config())
    args = kwargs.pop("args", None) or _args(tmp_path / "out", size)
    return DiffusionOPDTrainer(pipe, teachers, args=args, train_dataset={"motion": ROWS["motion"]}, **kwargs)


def test_ti2v_conditioned_frame_is_outside_the_sampler_and_the_kl(tmp_path):
    """TI2V's pipeline steps latent frame 0 with a velocity it never reads (it re-imposes the frame at every input
    and after the loop). The family's velocity is the transformer's output on the pipeline's input without that frame,
    so the per-step KL's elements are exactly the moved ones: the frame-0 outputs, which differ between two adapters,
    contribute nothing, and the KL is the closed form over frames 1.. only."""
    trainer = _trainer(tmp_path, "ti2v", args=_args(tmp_path / "out", TINY_WAN_TI2V_I2V_SIZE, guidance_scale=1.0))
    family, transformer = trainer.family, trainer.pipeline.transformer
    rows = ROWS["motion"]
    cond = trainer.prompt_cache([r["prompt"] for r in rows], [[r["image"]] for r in rows])
    x = family.init_latents(2, TINY_WAN_TI2V_I2V_SIZE, torch.Generator().manual_seed(1))
    assert x.shape == (2, 48, 1, 4, 6)
    t = torch.tensor([800.0, 300.0])
    # the pipeline's input: (1 - m)·condition + m·latents, timestep 0 on frame 0's 2 x 3 tokens
    mask = torch.ones(1, 1, 2, 4, 6)
    mask[:, :, 0] = 0
    full = (1 - mask) * cond["condition"] + mask * torch.cat([torch.randn(2, 48, 1, 4, 6), x], dim=2)
    timestep = (mask[0][0][:, ::2, ::2] * t[:, None, None, None]).flatten(1)
    outputs = {}
    with torch.no_grad():
        for adapter in ("student", trainer.teacher_specs["motion"][0].name):
            with trainer.adapters.use(adapter):
                outputs[adapter] = transformer(
                    hidden_states=full,
                    timestep=timestep,
                    encoder_hidden_states=cond["prompt_embeds"],
                    return_dict=False,
                )[0]
                ours = family.velocity(transformer, x, t / 1000, cond)
                torch.testing.assert_close(ours, outputs[adapter][:, :, 1:], atol=1e-5, rtol=1e-5)
    difference = outputs["student"] - outputs["motion"]
    assert difference[:, :, 0].abs().max() > 1e-3  # frame 0 would add to the KL were it stepped
    # The trainer's KL at its first step is the closed form on the pipeline's outputs without frame 0 (hand-made
    # here from the full transformer calls), averaged over the moved elements only.
    args = trainer.args
    _, kl = trainer.task_loss(trainer.model, "motion", rows, torch.Generator().manual_seed(0), backward=False)
    x0 = family.init_latents(2, TINY_WAN_TI2V_I2V_SIZE, torch.Generator().manual_seed(0))
    sigmas = family.sigmas(STEPS, TINY_WAN_TI2V_I2V_SIZE)
    full0 = (1 - mask) * cond["condition"] + mask * torch.cat([torch.zeros_like(x0), x0], dim=2)
    timestep0 = (mask[0][0][:, ::2, ::2] * sigmas[0] * 1000).flatten()[None].expand(2, -1)
    means = []
    with torch.no_grad():
        for adapter in ("student", "motion"):
            with trainer.adapters.use(adapter):
                out = transformer(
                    hidden_states=full0,
                    timestep=timestep0,
                    encoder_hidden_states=cond["prompt_embeds"],
                    return_dict=False,
                )[0]
            means.append(
                transition.step_mean(
                    x0, out[:, :, 1:], sigmas[0], sigmas[1], args.noise_level, args.sde_type, sigmas[1].item()
                )
            )
    expected = transition.closed_form_kl(
        *means, sigmas[0], sigmas[1], args.noise_level, args.sde_type, args.kl_normalization, sigmas[1].item()
    )
    assert args.kl_normalization == "reference" and expected.mean() > 0
    torch.testing.assert_close(kl[0], expected.mean(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("variant", ["wan21", "wan22", "ti2v"])
def test_velocity_depends_on_the_first_frame(variant):
    """Two first frames, the same prompt, latents and sigma: different velocities (the frame's condition latents, and
    CLIP's embeddings on 2.1, reach the transformer); the KL, reload and distillation rules are the family contract's
    (tests/test_family_contract.py, `wan22_i2v`)."""
    build, size, _ = VARIANTS[variant]
    family = get_family(get_tiny_wan_i2v_pipeline(seed=0, **build), max_sequence_length=16, num_frames=TINY_WAN_FRAMES)
    family.check_resolution(size)
    x = family.init_latents(1, size, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.95 if variant == "wan22" else 0.6])  # wan22: the high-noise expert
    with torch.no_grad():
        first, second = (
            family.velocity(family.denoiser, x, sigma, family.encode_prompts(["a cat walks"], [[frame]]))
            for frame in FRAMES[:2]
        )
    assert (first - second).abs().max() > 1e-3


def test_ti2v_decoded_video_starts_with_the_input_frame(tmp_path):
    """`generate` decodes the condition put back as latent frame 0: the first video frame is the VAE round trip of
    the input frame (resized to the video's size), whatever the student does."""
    trainer = _trainer(tmp_path, "ti2v", args=_args(tmp_path / "out", TINY_WAN_TI2V_I2V_SIZE))
    row = ROWS["motion"][0]
    video = trainer.generate([row["prompt"]], images=[[row["image"]]], num_inference_steps=2)[0]
    pipe = trainer.pipeline
    height, width = TINY_WAN_TI2V_I2V_SIZE
    cond = trainer.prompt_cache([row["prompt"]], [[row["image"]]])
    expected = trainer.family.decode(cond["condition"], TINY_WAN_TI2V_I2V_SIZE)[0][0]
    assert video[0].size == (width, height) == expected.size
    assert np.abs(np.asarray(video[0], dtype=float) - np.asarray(expected, dtype=float)).max() <= 2
    assert pipe.vae is not None


def test_rows_without_a_first_frame_or_with_too_many_are_refused(tmp_path):
    pipe = get_tiny_wan_i2v_pipeline(seed=0)
    teachers = WAN22_I2V.save_teachers(pipe, tmp_path / "t", tasks=1)
    rows = [ROWS["motion"][0], {"prompt": "no frame here"}]
    with pytest.raises(ValueError, match=r"^Task 'motion' row 1 \('no frame here'\) has no `image`") as error:
        DiffusionOPDTrainer(pipe, teachers, args=_args(tmp_path / "o"), train_dataset={"motion": rows})
    assert "\n" not in str(error.value)
    ti2v = get_tiny_wan_i2v_pipeline(seed=0, ti2v=True)
    rows = [{"prompt": "first and last", "image": FRAMES[:2]}]
    with pytest.raises(ValueError, match=r"row 0 \('first and last'\) has 2 input images, .* takes at most 1"):
        DiffusionOPDTrainer(
            ti2v,
            WAN22_I2V.save_teachers(ti2v, tmp_path / "t2", tasks=1),
            args=_args(tmp_path / "o2", TINY_WAN_TI2V_I2V_SIZE),
            train_dataset={"motion": rows},
        )


def test_two_experts_keep_ddp_find_unused_parameters(tmp_path):
    """A step whose rows all run one expert leaves the other idle: unset, DDP finds unused parameters (the Trainer's
    default for a non-`PreTrainedModel` module); set to false it is refused in one line."""
    trainer = _trainer(tmp_path, "wan22")
    assert trainer._build_accelerator_args()["kwargs_handlers"][0].find_unused_parameters is True
    with pytest.raises(ValueError, match="^`ddp_find_unused_parameters` cannot be false with two experts"):
        _trainer(tmp_path / "b", "wan22", args=_args(tmp_path / "o", ddp_find_unused_parameters=False))


def test_generate_images_passes_the_first_frame_and_the_frame_changes_the_video():
    """The evaluation samples each image-to-video row through `WanImageToVideoPipeline.__call__` with its first frame
    (`image=`), its frame count and both CFG scales: the same call made by hand gives the same video, and another
    input frame (same prompt and seed) another video."""
    pipe = get_tiny_wan_i2v_pipeline(seed=0, two_experts=True)
    settings = (STEPS, 3.0, TINY_WAN_I2V_SIZE, 16, TINY_WAN_FRAMES, 2.0)
    first, second = generate_images(pipe, ["a cat walks"] * 2, [5, 5], *settings, images=[FRAMES[:1], FRAMES[1:2]])
    assert len(first) == TINY_WAN_FRAMES and first[0].size == (TINY_WAN_I2V_SIZE[1], TINY_WAN_I2V_SIZE[0])
    direct = pipe(
        image=FRAMES[0],
        prompt="a cat walks",
        negative_prompt="",
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        guidance_scale_2=2.0,
        height=TINY_WAN_I2V_SIZE[0],
        width=TINY_WAN_I2V_SIZE[1],
        num_frames=TINY_WAN_FRAMES,
        max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="pil",
    ).frames[0]
    assert [frame.tobytes() for frame in first] == [frame.tobytes() for frame in direct]
    difference = [np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(first, second)]
    assert min(difference) > 0  # every frame, not only the first, depends on the input frame


def test_eval_command_shows_and_writes_each_video_after_its_input_frame(tmp_path):
    """`trl-diffusion-opd eval` on the tiny Wan 2.1 I2V with rows carrying a first frame (a PNG path): the frame grid's
    first column is each row's input frame (squashed to the video's size, then to the tile), every written video
    starts with it before the pipeline's frames, and the student's (toy adapter's) video changes with the frame."""
    prompts = {}
    for i, (column, frame) in enumerate(zip(("brightness", "brightness@other"), FRAMES[:2])):
        frame.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"prompt": "a cat walks", "image": f"{i}.png"}) + "\n")
        prompts[column] = str(tmp_path / f"{i}.jsonl")  # two sets, one row each: the same prompt and seed
    out = tmp_path / "eval"
    argv = [
        "--model_name_or_path", "tiny:wan_i2v",
        "--adapters", '{"toy": "toy:1"}',
        "--prompts", json.dumps(prompts),
        "--resolution", "x".join(map(str, TINY_WAN_I2V_SIZE)),
        "--num_frames", str(TINY_WAN_FRAMES),
        "--num_inference_steps", "2",
        "--guidance_scale", "2.0",
        "--max_sequence_length", "512",
        "--output_dir", str(out),
        "--device", "cpu",
    ]  # fmt: skip
    assert eval_script.main(argv) == 0
    height, width = TINY_WAN_I2V_SIZE
    videos = {}
    for label in ("base", "toy"):
        grid = np.asarray(Image.open(out / "grids" / f"{label}.png").convert("RGB"), dtype=int)
        # 2 rows of 1 input + 5 frames at 256-pixel tiles after the 160-pixel label column, 4-pixel padding
        assert grid.shape == (2 * (256 + 4) + 4, 160 + 6 * (256 + 4) + 4, 3)
        for k, frame in enumerate(FRAMES[:2]):
            squashed = frame.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            tile = np.asarray(squashed.resize((256, 256), Image.Resampling.BICUBIC), dtype=int)
            top = 4 + k * (256 + 4)
            assert np.array_equal(grid[top : top + 256, 164 : 164 + 256], tile)
            decoded = _decode(out / "videos" / label / f"{k}-0.webp")
            assert len(decoded) == 1 + TINY_WAN_FRAMES and np.array_equal(decoded[0], np.asarray(squashed))
            videos[label, k] = np.stack(decoded[1:]).astype(int)
    assert np.abs(videos["toy", 0] - videos["base", 0]).max() > 0  # the adapter is on
    assert all(np.abs(videos["toy", 0][f] - videos["toy", 1][f]).max() > 0 for f in range(TINY_WAN_FRAMES))


def _decode(path) -> list[np.ndarray]:
    """The frames of an animated WebP."""
    with Image.open(path) as video:
        frames = []
        for index in range(video.n_frames):
            video.seek(index)
            frames.append(np.asarray(video.convert("RGB")))
    return frames


def _configs_only_base(folder, **build):
    """A folder with the tiny pipeline's `model_index.json` and component configs but no weights: a base that fails
    if anything tries to load it."""
    pipe = get_tiny_wan_i2v_pipeline(seed=0, **build)
    pipe.save_config(folder)
    for component in ("transformer", "vae"):
        getattr(pipe, component).save_config(folder / component)
    return str(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": [{"prompt": "a cat walks", "image": "0.png"}, {"prompt": "no frame"}]},
         "Task 'motion' row 1 ('no frame') has no `image`: the wan-i2v family (WanImageToVideoPipeline) generates"),
        ({"rows": [{"prompt": "a cat walks", "image": "broken.png"}]}, "task 'motion': row 0 ('a cat walks'): "
         "input image '{tmp}/broken.png' is not a readable image"),
        ({"resolution": "40x48"}, "`resolution` must be a multiple of 16 for this wan-i2v pipeline (VAE scale factor 8 "
         "x latent patch 2), got 40x48; e.g. 32x48."),
        ({"num_frames": "6"}, "num_frames must be 1 + a multiple of 4, got 6."),
        ({"build": {"ti2v": True}, "rows": [{"prompt": "first and last", "image": ["0.png", "0.png"]}]},
         "Task 'motion' row 0 ('first and last') has 2 input images, but the wan-i2v family "
         "(WanImageToVideoPipeline) takes at most 1."),
    ],
)  # fmt: skip
def test_bad_i2v_input_is_one_line_before_the_base_loads(tmp_path, capsys, monkeypatch, change, message):
    """Through `trl-diffusion-opd train`: a row without its first frame, an unreadable frame, a size off the VAE x
    patch grid, a frame count off 4k + 1, too many frames for the checkpoint: exit 2 with one line naming the row (and
    file), read from the base's configs alone. The base is a folder of configs without weights, and loading any
    pipeline raises, so the check ran before any model loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", forbidden)
    monkeypatch.chdir(tmp_path)
    FRAMES[0].save(tmp_path / "0.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = change.get("rows", [{"prompt": "a cat walks", "image": "0.png"}])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    size = TINY_WAN_TI2V_I2V_SIZE if change.get("build") else TINY_WAN_I2V_SIZE
    argv = [
        "train",
        "--model_name_or_path", _configs_only_base(tmp_path / "base", **change.get("build", {})),
        "--teachers", '{"motion": "toy:1"}',
        "--prompts", '{"motion": "rows.jsonl"}',
        "--resolution", change.get("resolution", "x".join(map(str, size))),
        "--num_frames", change.get("num_frames", str(TINY_WAN_FRAMES)),
        "--output_dir", str(tmp_path / "out"),
        "--report_to", "none",
    ]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"trl-diffusion-opd train: error: {message.format(tmp=tmp_path)}"), err
    assert not (tmp_path / "out").exists()


def test_pipeline_class_runs_a_text_to_video_base_as_image_to_video():
    """`pipeline_class` (the model arguments): TI2V-5B's base, a `WanPipeline`, loads as `WanImageToVideoPipeline` on
    the same components with `expand_timesteps`, which the family then runs from a first frame; a name that is not a
    diffusers pipeline class, or components that do not make one, are refused in one line."""
    pipe = registry.load_pipeline("tiny:wan22_ti2v", pipeline_class="WanImageToVideoPipeline")
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.expand_timesteps is True
    assert pipe.name_or_path == "tiny:wan22_ti2v"
    family = get_family(pipe, max_sequence_length=16, num_frames=TINY_WAN_FRAMES)
    assert family.name == "wan-i2v" and family.expand and family.max_input_images == 1
    with pytest.raises(ValueError, match=r"^`pipeline_class` must be a diffusers pipeline class .*, got "
                       r"'WanImageToVideoPipelin'\. Did you mean WanImageToVideoPipeline"):  # fmt: skip
        DiffusionModelConfig(model_name_or_path="tiny:wan22_ti2v", pipeline_class="WanImageToVideoPipelin")
    with pytest.raises(ValueError, match="^`pipeline_class` must be a diffusers pipeline class"):
        DiffusionModelConfig(model_name_or_path="tiny:wan22_ti2v", pipeline_class="AutoencoderKLWan")
    with pytest.raises(
        ValueError, match=r"^'tiny:sd3' \(StableDiffusion3Pipeline\) does not load as `pipeline_class` "
    ):
        registry.load_pipeline("tiny:sd3", pipeline_class="WanImageToVideoPipeline")


def test_eval_refuses_a_row_without_its_frame_before_the_base_loads(tmp_path, capsys, monkeypatch):
    """`trl-diffusion-opd eval` on a configs-only image-to-video base: a prompt row without its first frame is one line
    naming the column and row (exit 2), and nothing is loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", forbidden)
    argv = [
        "eval",
        "--model_name_or_path", _configs_only_base(tmp_path / "base"),
        "--prompts", '{"brightness": ["a cat walks"]}',
        "--resolution", "x".join(map(str, TINY_WAN_I2V_SIZE)),
        "--num_frames", str(TINY_WAN_FRAMES),
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "trl-diffusion-opd eval: error: Prompts 'brightness' row 0 ('a cat walks') has no `image`: the wan-i2v family "
        "(WanImageToVideoPipeline) generates a video from each row's first frame.\n"
    )
    assert not (tmp_path / "eval").exists()
