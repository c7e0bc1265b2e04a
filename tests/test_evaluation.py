"""Evaluation: the `eval` command's table and grids on the tiny pipeline, the Python API, and reward metrics and sample
grids while training."""

import json
import math

import pytest
import torch
from PIL import Image
from transformers.integrations import TensorBoardCallback

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, cli, rewards
from trl_diffusion_opd.evaluation import EvaluationConfig, evaluate_models, generate_images
from trl_diffusion_opd.figures import make_grid
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora
from trl_diffusion_opd.trainer.callbacks import DiffusersTensorBoardCallback, RewardEvalCallback


PROMPTS = ["a red circle", "a blue square", 'a sign that says "open"']
SAMPLING = {"num_inference_steps": 3, "resolution": 32, "max_sequence_length": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
    rewards.clear_reward_cache()


@pytest.fixture
def adapters(tmp_path):
    """The same strong random LoRA in diffusers and in PEFT format (the released teachers' format)."""
    pipe = get_tiny_sd3_pipeline(seed=0)
    save_toy_lora(pipe, tmp_path / "lora", seed=5, rank=4, std=0.6)
    save_toy_lora(pipe, tmp_path / "peft", seed=6, rank=4, lora_alpha=8, std=0.6, format="peft")
    return {"lora": str(tmp_path / "lora"), "peft": str(tmp_path / "peft")}


def _user_brightness(folder, prompts, seed=0):
    """What a user gets: plain diffusers, one image per call, the adapter loaded with `load_lora_weights`."""
    pipe = get_tiny_sd3_pipeline(seed=0)
    if folder is not None:
        pipe.load_lora_weights(folder, adapter_name="user")
    scores = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        image = pipe(
            prompt,
            guidance_scale=4.5,
            height=32,
            width=32,
            generator=generator,
            **{k: v for k, v in SAMPLING.items() if k != "resolution"},
        ).images[0]
        scores.append(rewards.get_reward("brightness")([image])[0])
    return scores


def test_eval_command_writes_table_and_grids_and_rows_differ(tmp_path, adapters, capsys):
    prompts_txt = tmp_path / "prompts.txt"
    prompts_txt.write_text("\n".join(PROMPTS) + "\n")
    rows = [{"prompt": "a green field", "tag": "x"}, {"prompt": "a dark night", "tag": "y"}]
    prompts_jsonl = tmp_path / "meta.jsonl"
    prompts_jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "eval"
    code = cli.main(
        [
            "eval",
            "--model_name_or_path",
            "tiny:sd3",
            "--adapters",
            json.dumps(adapters),
            "--prompts",
            json.dumps(
                {
                    "brightness": str(prompts_txt),
                    "saturation": str(prompts_txt),
                    "jpeg_compressibility@meta": str(prompts_jsonl),
                }
            ),
            "--num_inference_steps",
            str(SAMPLING["num_inference_steps"]),
            "--resolution",
            "32",
            "--max_sequence_length",
            "8",
            "--batch_size",
            "2",
            "--grid_size",
            "2",
            "--output_dir",
            str(output),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    table = (output / "results.md").read_text()
    assert "| model | adapter | brightness | saturation | jpeg_compressibility@meta | Average |" in table
    assert table in out  # printed too
    result = json.loads((output / "results.json").read_text())
    assert [row["model"] for row in result["rows"]] == ["base", "lora", "peft"]
    assert result["settings"]["prompts"] == {"brightness": 3, "saturation": 3, "jpeg_compressibility@meta": 2}
    by_model = {row["model"]: row for row in result["rows"]}
    for row in result["rows"]:
        scores = row["scores"]
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert row["average"] == pytest.approx(sum(scores.values()) / 3)  # every range here is [0, 1]
        assert f"| {row['model']} | " in table and f"{row['average']:.4f}" in table
        assert len(result["per_image"][row["model"]]["brightness"]) == 3
        grid = Image.open(row["grid"])
        assert grid.size == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2)  # 2 prompt sets x first 2 images, 256 px tiles
    base = result["per_image"]["base"]["brightness"]
    for label in ["lora", "peft"]:  # the adapter changes the images (a skipped PEFT file would equal the base)
        assert max(abs(a - b) for a, b in zip(result["per_image"][label]["brightness"], base)) > 1e-3
    assert by_model["lora"]["scores"] != by_model["base"]["scores"]
    # Same prompts and seeds as a user's own pipeline calls, with the adapter loaded as users load it.
    assert base == pytest.approx(_user_brightness(None, PROMPTS), abs=1e-6)
    assert result["per_image"]["lora"]["brightness"] == pytest.approx(
        _user_brightness(adapters["lora"], PROMPTS), abs=1e-6
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", '{"nope": ["a"]}'], "`prompts` names unknown reward(s) ['nope']; available rewards:"),
        (["--prompts", '{"brightness": "missing.txt"}'], "prompt file 'missing.txt' does not exist"),
        (["--prompts", '{"brightness": ["a"]}', "--adapters", '{"x": "./no-such-folder"}'], "no-such-folder"),
        (["--prompts", '{"brightness": ["a"]}', "--not_a_flag", "1"], "unrecognized arguments: --not_a_flag 1"),
        ([], "`prompts` is required"),
        (
            [
                "--prompts",
                '{"geneval": ["a"]}',
                "--reward_kwargs",
                '{"geneval": {"url": "127.0.0.1:9", "retries": 0}}',
            ],
            "Reward 'geneval': no reward server answers at http://127.0.0.1:9",
        ),
    ],
)
def test_eval_command_errors_are_one_line(tmp_path, capsys, extra, message):
    argv = ["eval", "--model_name_or_path", "tiny:sd3", "--output_dir", str(tmp_path / "e"), "--resolution", "32"]
    argv += ["--num_inference_steps", "1", "--max_sequence_length", "4", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the progress bar, when generation had started
    assert last.startswith("trl-diffusion-opd eval: error:") and message in last
    assert "Traceback" not in err


def test_shared_prompt_sets_generate_once_and_nan_scores_are_skipped(tmp_path):
    pipe = get_tiny_sd3_pipeline(seed=0, with_t5=False)
    calls = []
    original = pipe.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    seen = {}

    def record(name):
        def fn(images, prompts, metadata):
            seen.setdefault(name, []).extend(image.tobytes() for image in images)
            return [math.nan if "skip" in p else 1.0 for p in prompts]

        return fn

    pipe.__class__.__call__ = counting
    try:
        result = evaluate_models(
            pipe,
            prompts={"a": ["one", "skip two", "three"], "b@same": ["one", "skip two", "three"], "c": ["other"]},
            rewards={"a": record("a"), "b": record("b"), "c": record("c")},
            normalization={"a": [0, 2], "b": [0, 1]},
            batch_size=2,
            progress=False,
            **SAMPLING,
        )
    finally:
        pipe.__class__.__call__ = original
    assert calls == [2, 1, 1]  # 3 prompts shared by two columns, then 1: each set generated once
    assert seen["a"] == seen["b"]
    assert result.scores["base"] == {"a": 1.0, "b@same": 1.0, "c": 1.0}
    assert result.counts["base"] == {"a": 2, "b@same": 2, "c": 1}
    assert result.average["base"] == pytest.approx((0.5 + 1.0) / 2)  # "c" has no range: left out
    assert "left out (no range): c" in result.to_markdown()
    assert result.to_dict()["per_image"]["base"]["a"] == [1.0, None, 1.0]


def test_generated_images_do_not_depend_on_the_batch():
    pipe = get_tiny_sd3_pipeline(seed=0, with_t5=False)
    together = generate_images(pipe, ["x", "y", "z"], [7, 8, 9], 2, 4.5, 32)
    alone = generate_images(pipe, ["z"], [9], 2, 4.5, 32)
    assert together[2].tobytes() == alone[0].tobytes()
    grid = make_grid([together, alone], size=16, padding=1)
    assert grid.size == (3 * 16 + 4, 2 * 16 + 3)


def test_training_with_eval_steps_logs_rewards_and_writes_sample_grids(tmp_path, adapters, monkeypatch):
    pytest.importorskip("tensorboard")  # the `tensorboard` extra (also in `test`)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))

    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        resolution=32,
        num_inference_steps=3,
        per_device_train_batch_size=2,
        max_sequence_length=1,
        learning_rate=3e-3,
        save_strategy="no",
        ema=True,
        ema_update_interval=1,
        report_to=["tensorboard"],
        disable_tqdm=True,
        seed=0,
    )
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"a": adapters["lora"], "b": adapters["peft"]},
        args=args,
        train_dataset={"a": ["x y", "z w", "v u"], "b": ["p q", "r s"]},
    )
    callback = RewardEvalCallback(
        trainer, rewards={"a": "brightness", "b": ["brightness", "saturation"]}, eval_steps=1, num_prompts=2
    )
    trainer.add_callback(callback)
    # transformers' TensorBoardCallback cannot serialise a diffusers config (the trainer should make this swap).
    trainer.pop_callback(TensorBoardCallback)
    trainer.add_callback(DiffusersTensorBoardCallback)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if any(k.startswith("rewards/") for k in entry)]
    assert [entry["step"] for entry in logged] == [1, 2]
    # The training log of those steps is intact: loss, gradient norm and the round's KL metrics.
    training = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in training] == [1, 2]
    assert all("grad_norm" in entry and "kl/a" in entry and "kl/b" in entry for entry in training)
    for entry in logged:
        assert {k for k in entry if k.startswith("rewards/")} == {
            "rewards/a/brightness",
            "rewards/b/brightness",
            "rewards/b/saturation",
        }
        assert all(0.0 <= entry[k] <= 1.0 for k in entry if k.startswith("rewards/"))
    # The logged value is the reward of the student's (EMA) samples of the fixed prompts.
    images = trainer.generate(["x y", "z w"], seed=0)
    assert logged[-1]["rewards/a/brightness"] == pytest.approx(sum(rewards.get_reward("brightness")(images)) / 2)

    samples = sorted(p.name for p in (tmp_path / "out" / "samples").glob("*.png"))
    assert samples == ["step-000001.png", "step-000002.png"]  # the end of training was sampled at step 2 already
    grid = Image.open(tmp_path / "out" / "samples" / "step-000002.png")
    assert grid.size == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2)  # a row per task, 2 prompts each
    assert trainer.sample_widgets == [{"text": "a: x y | z w · b: p q | r s", "url": "samples/step-000002.png"}]
    trainer.save_model()
    assert "samples/step-000002.png" in (tmp_path / "out" / "README.md").read_text()

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [event.step for event in events.Images("samples")] == [1, 2]
    assert [event.step for event in events.Scalars("train/rewards/b/saturation")] == [1, 2]


def test_sampling_at_the_end_without_eval_steps(tmp_path, adapters):
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=32,
        num_inference_steps=2,
        per_device_train_batch_size=1,
        max_sequence_length=1,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"a": adapters["lora"]},
        args=args,
        train_dataset={"a": ["x y", "z w"]},
        eval_dataset={"a": ["held out"]},
    )
    callback = RewardEvalCallback(trainer, rewards="brightness,saturation")
    trainer.add_callback(callback)
    trainer.train()
    assert [entry["step"] for entry in callback.history] == [1]
    assert set(callback.history[0]) == {"step", "rewards/a/brightness", "rewards/a/saturation"}
    assert callback.prompts == {"a": [{"prompt": "held out"}]}  # the eval prompts, when there are some
    assert (tmp_path / "out" / "samples" / "step-000001.png").is_file()


def test_eval_command_with_a_toy_adapter_on_the_tiny_base(tmp_path, capsys):
    argv = ["eval", "--model_name_or_path", "tiny:sd3", "--adapters", '{"toy": "toy:1"}', "--include_base", "false"]
    argv += ["--prompts", '{"saturation": ["a red circle", "a blue square"]}', "--num_inference_steps", "2"]
    argv += ["--resolution", "32", "--max_sequence_length", "4", "--output_dir", str(tmp_path / "e")]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [row["model"] for row in result["rows"]] == ["toy"]  # --include_base false: no base row
    assert (tmp_path / "e" / "_toy_adapters" / "toy" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "e" / "grids" / "toy.png").is_file()


def test_reward_specs_for_the_training_callback():
    from trl_diffusion_opd.trainer.callbacks import _parse_rewards

    tasks = ["a", "b"]
    assert _parse_rewards("brightness, saturation", tasks) == {t: ["brightness", "saturation"] for t in tasks}
    assert _parse_rewards('{"a": "brightness"}', tasks) == {"a": ["brightness"], "b": []}
    assert _parse_rewards(["ocr"], tasks) == {"a": ["ocr"], "b": ["ocr"]}
    assert _parse_rewards(None, tasks) == {"a": [], "b": []}
    reward = rewards.get_reward("brightness")
    assert _parse_rewards({"b": reward}, tasks) == {"a": [], "b": [reward]}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]; tasks are \['a', 'b'\]"):
        _parse_rewards({"c": "ocr"}, tasks)


def test_eval_rewards_config_field_adds_the_callback(tmp_path, adapters):
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        resolution=32,
        num_inference_steps=2,
        per_device_train_batch_size=1,
        max_sequence_length=1,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
        eval_rewards="brightness",
        eval_steps=1,
    )
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"a": adapters["lora"], "b": adapters["peft"]},
        args=args,
        train_dataset={"a": ["x y", "z w"], "b": ["p q", "r s"]},
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/a/brightness" in h]
    assert len(logged) == 2
    assert all(0.0 <= h["rewards/b/brightness"] <= 1.0 for h in logged)
    assert sorted(p.name for p in (tmp_path / "out" / "samples").glob("step-*.png")) == [
        "step-000001.png",
        "step-000002.png",
    ]


def test_adapter_of_another_model_is_refused_before_scoring(tmp_path, capsys):
    """PEFT and diffusers only warn about LoRA weights that fit no module of the base and load the rest: a FLUX LoRA on
    an SD3 base would give a table row (partly the base). `eval` refuses it in one line naming an example key."""
    from trl_diffusion_opd.evaluation import load_adapter
    from trl_diffusion_opd.testing import get_tiny_flux_pipeline

    save_toy_lora(get_tiny_flux_pipeline(seed=0), tmp_path / "flux", seed=1)
    argv = ["eval", "--model_name_or_path", "tiny:sd3", "--adapters", json.dumps({"flux": str(tmp_path / "flux")})]
    argv += ["--prompts", '{"brightness": ["a"]}', "--num_inference_steps", "1", "--resolution", "32"]
    argv += ["--max_sequence_length", "4", "--output_dir", str(tmp_path / "e")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"trl-diffusion-opd eval: error: Adapter 'flux' ({tmp_path / 'flux'}) does not fit this base: 3 of the 7 "
        "modules it adapts are not in its transformer, e.g. "
        "'transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight'. Is it a LoRA for another model?"
    )
    assert "Traceback" not in err and not (tmp_path / "e" / "results.json").exists()

    # Same module names, other sizes (an SD3 LoRA of a wider SD3), in both formats.
    wide = get_tiny_sd3_pipeline(seed=0, attention_head_dim=16)
    base = get_tiny_sd3_pipeline(seed=0)
    for format, key in [("diffusers", "transformer.transformer_blocks"), ("peft", "transformer_blocks")]:
        folder = save_toy_lora(wide, tmp_path / format, seed=1, format=format)
        with pytest.raises(ValueError) as error:
            load_adapter(base, "wide", str(folder))
        assert str(error.value) == (
            f"Adapter 'wide' ({folder}) does not fit this base: 8 of the 8 modules it adapts have other sizes in its "
            f"transformer, e.g. '{key}.0.attn.to_k.lora_A.weight' has 64 input features where the base has 32. Is "
            "it a LoRA for another model?"
        )
    assert not [name for name, _ in base.transformer.named_modules() if "lora" in name]  # refused before loading


def test_evaluation_config_and_keywords_give_the_same_table(tmp_path, adapters):
    """`evaluate_models(..., config=EvaluationConfig(...))` and the same settings as keywords sample and score the
    same images; keywords replace the config's fields; a keyword that is no field is a `TypeError`."""
    prompts = {"brightness": PROMPTS[:2]}
    settings = {**SAMPLING, "seed": 3, "progress": False, "include_base": False}
    config = EvaluationConfig(**settings)
    by_config = evaluate_models(get_tiny_sd3_pipeline(seed=0), prompts, {"lora": adapters["lora"]}, config=config)
    by_keywords = evaluate_models(get_tiny_sd3_pipeline(seed=0), prompts, {"lora": adapters["lora"]}, **settings)
    pipe = get_tiny_sd3_pipeline(seed=0)
    assert by_config.per_image == by_keywords.per_image and by_config.settings == by_keywords.settings
    assert by_config.settings["seed"] == 3 and [m.label for m in by_config.models] == ["lora"]
    replaced = evaluate_models(pipe, prompts, config=config, seed=4, include_base=True)
    assert replaced.settings["seed"] == 4 and config.seed == 3  # the config itself is left as it was
    assert replaced.per_image["base"]["brightness"] != by_config.per_image["lora"]["brightness"]
    with pytest.raises(TypeError, match="grid_sizee"):
        evaluate_models(pipe, prompts, grid_sizee=2)
