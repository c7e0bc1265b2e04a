"""Merging LoRA adapters with PEFT (`trl_diffusion_opd.merging`, `trl-diffusion-opd merge`): `cat` is exactly the
weighted sum of the deltas, the written file loads with diffusers, TIES and DARE run, the command's errors are one
line, and a DiffusionOPD student started from a merge starts with the merge's velocities."""

import copy
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, cli
from trl_diffusion_opd.lora_io import lora_config_for, read_lora_folder
from trl_diffusion_opd.merging import check_merge_settings, merge_adapters
from trl_diffusion_opd.testing import (
    get_tiny_flux_pipeline,
    get_tiny_sd3_pipeline,
    get_tiny_wan_pipeline,
    save_toy_lora,
)


TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
PROMPTS = ["a red cube", "two green cones", "a blue ball on a box"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three LoRAs of the tiny SD3 base: ranks 2 / 2 / 4, alphas 4 / 2 / 4 (scalings 2, 1, 1), one in PEFT format."""
    folder = tmp_path_factory.mktemp("adapters")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    save_toy_lora(pipe, folder / "a", seed=1, rank=2, lora_alpha=4, std=0.2)
    save_toy_lora(pipe, folder / "b", seed=2, rank=2, std=0.2, format="peft")
    save_toy_lora(pipe, folder / "c", seed=3, rank=4, std=0.2)
    return {name: str(folder / name) for name in "abc"}


def _with_deltas(pipe, folders: dict[str, str], weights: dict[str, float]):
    """A copy of `pipe`'s transformer whose adapted weights are W + Σ w_i ΔW_i, ΔW_i = (alpha_i / r_i) B_i A_i."""
    transformer = copy.deepcopy(pipe.transformer)
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for label, folder in folders.items():
            state, config = read_lora_folder(folder)
            lora = lora_config_for(state, config)
            for key, a in state.items():
                if ".lora_A." in key:
                    b = state[key.replace(".lora_A.", ".lora_B.")]
                    name = key.split(".lora_A.")[0]
                    modules[name].weight += weights[label] * (lora.lora_alpha / lora.r) * (b @ a)
    return transformer


def _velocity(transformer, seed=0):
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, config.in_channels, 8, 8), generator=generator)
    text = torch.randn((2, 5, config.joint_attention_dim), generator=generator)
    pooled = torch.randn((2, config.pooled_projection_dim), generator=generator)
    with torch.no_grad():
        return transformer(x, text, pooled, torch.tensor([900.0, 300.0]), return_dict=False)[0]


def _loaded(folder):
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    pipe.load_lora_weights(str(folder), adapter_name="merged")
    return pipe


def test_cat_is_the_weighted_sum_of_the_deltas(tmp_path, adapters):
    """The file written for `cat` loads with `pipe.load_lora_weights` and gives the velocity of W + Σ w_i ΔW_i, for
    adapters of different ranks and scalings and a negative weight."""
    weights = {"a": 0.5, "b": -0.25, "c": 1 / 3}
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    base = _velocity(pipe.transformer)
    merged = merge_adapters(pipe, adapters, weights, combination_type="cat")
    assert merged.configs["transformer"].r == merged.configs["transformer"].lora_alpha == 2 + 2 + 4
    merged.save(tmp_path / "cat", pipe, base_name="tiny:sd3")
    # The base is left as it was (PEFT's layers unloaded), so it can load the merge itself.
    assert torch.equal(_velocity(pipe.transformer), base)
    loaded = _velocity(_loaded(tmp_path / "cat").transformer)
    expected = _velocity(_with_deltas(pipe, adapters, weights))
    assert (expected - base).abs().max() > 1e-2  # the merge changes the velocity
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    card = (tmp_path / "cat" / "README.md").read_text()
    assert 'combination_type="cat"' in card and "| b | `b` | -0.25 |" in card and "ΔW = Σ w_i ΔW_i" in card


def test_svd_is_exact_at_full_rank_and_linear_is_not_the_sum(tmp_path, adapters):
    """`svd` at a rank >= Σ r_i equals the sum of the deltas; PEFT's `linear` sums the factors instead, so its
    velocity is another (cross terms B_i A_j)."""
    pair = {"a": adapters["a"], "b": adapters["b"]}
    weights = {"a": 0.5, "b": 0.5}
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    base = _velocity(pipe.transformer)
    expected = _velocity(_with_deltas(pipe, pair, weights))
    merge_adapters(pipe, pair, weights, "svd", svd_rank=4).save(tmp_path / "svd", pipe, card=False)
    merge_adapters(pipe, pair, weights, "linear").save(tmp_path / "linear", pipe, card=False)
    torch.testing.assert_close(_velocity(_loaded(tmp_path / "svd").transformer), expected, atol=1e-5, rtol=1e-5)
    linear = _velocity(_loaded(tmp_path / "linear").transformer)
    assert (linear - expected).abs().max() > 0.1 * (expected - base).abs().max()


def _keys(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def test_ties_and_dare_write_loadable_adapters(tmp_path, adapters):
    """TIES and DARE (on the factors and on the deltas) write a LoRA of the adapted modules, with the rank each
    implies, that diffusers loads; DARE's random drop follows `seed`."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    pair = {"a": adapters["a"], "b": adapters["b"]}
    expected_modules = {key.split(".lora_")[0] for key in read_lora_folder(adapters["a"])[0]}
    for combination, kwargs, rank in (
        ("ties", {"density": 0.5}, 2),
        ("dare_linear", {"density": 0.5}, 2),
        ("ties_svd", {"density": 0.5, "svd_rank": 3}, 3),
        ("dare_ties_svd", {"density": 0.7}, 4),  # the largest rank when `svd_rank` is not given
    ):
        group = adapters if combination.endswith("svd") else pair
        merge_adapters(pipe, group, 1.0, combination, **kwargs).save(tmp_path / combination, pipe)
        shapes = _keys(tmp_path / combination / "pytorch_lora_weights.safetensors")
        assert {key.removeprefix("transformer.").split(".lora_")[0] for key in shapes} == expected_modules
        assert {shape[0] for key, shape in shapes.items() if ".lora_A." in key} == {rank}, combination
        _loaded(tmp_path / combination)
    same = merge_adapters(pipe, pair, 0.5, "dare_linear", density=0.5, seed=3).state_dicts["transformer"]
    again = merge_adapters(pipe, pair, 0.5, "dare_linear", density=0.5, seed=3).state_dicts["transformer"]
    other = merge_adapters(pipe, pair, 0.5, "dare_linear", density=0.5, seed=4).state_dicts["transformer"]
    assert all(torch.equal(same[key], again[key]) for key in same)
    assert any(not torch.equal(same[key], other[key]) for key in same)


def test_two_experts_merge_into_one_file_each(tmp_path):
    """Wan 2.2 A14B: each expert's LoRAs merge on that expert and are written as its own file, which diffusers
    loads into it; an adapter with a LoRA for one expert only adds nothing to the other."""
    pipe = get_tiny_wan_pipeline(two_experts=True)
    save_toy_lora(pipe, tmp_path / "both", seed=1, rank=2)
    save_toy_lora(pipe, tmp_path / "both", seed=2, rank=2, expert="transformer_2")
    save_toy_lora(pipe, tmp_path / "low", seed=3, rank=2, expert="transformer_2")
    merged = merge_adapters(pipe, {"both": str(tmp_path / "both"), "low": str(tmp_path / "low")}, 0.5)
    assert {expert: config.r for expert, config in merged.configs.items()} == {"transformer": 2, "transformer_2": 4}
    merged.save(tmp_path / "merged", pipe)
    low = "pytorch_lora_weights_transformer_2.safetensors"
    assert (tmp_path / "merged" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "merged" / low).is_file()
    assert f'weight_name="{low}", load_into_transformer_2=True' in (tmp_path / "merged" / "README.md").read_text()
    fresh = get_tiny_wan_pipeline(two_experts=True)
    fresh.load_lora_weights(str(tmp_path / "merged"), adapter_name="m")
    fresh.load_lora_weights(str(tmp_path / "merged"), weight_name=low, adapter_name="m", load_into_transformer_2=True)
    assert {m.r["m"] for m in fresh.transformer_2.modules() if hasattr(m, "r") and "m" in m.r} == {4}


def test_merge_command_and_its_one_line_errors(tmp_path, adapters, capsys):
    """`trl-diffusion-opd merge` from a YAML file writes the adapter and its card; bad weights, an unknown adapter,
    a missing density and a LoRA of another base are one line each, and nothing is written."""
    config = {
        "model_name_or_path": "tiny:sd3",
        "adapters": {"a": adapters["a"], "b": adapters["b"]},
        "weights": {"a": 0.5, "b": 0.5},
        "combination_type": "cat",
        "output_dir": str(tmp_path / "merged"),
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["merge", "--config", str(path)]) == 0
    assert "Merged 2 adapter(s) (cat; weights a 0.5, b 0.5)" in capsys.readouterr().out
    assert (tmp_path / "merged" / "pytorch_lora_weights.safetensors").is_file()
    assert "`tiny:sd3`" in (tmp_path / "merged" / "README.md").read_text()

    save_toy_lora(get_tiny_flux_pipeline(), tmp_path / "flux", seed=1, rank=2)
    base = ["merge", "--model_name_or_path", "tiny:sd3", "--output_dir", str(tmp_path / "bad")]
    both = json.dumps({"a": adapters["a"], "b": adapters["b"]})
    cases = {
        "`weights` names adapter(s) ['x'] that are not in `adapters` ['a', 'b']": [
            "--adapters",
            both,
            "--weights",
            '{"a": 1, "x": 2}',
        ],
        "`weights['a']` must be a finite number, got 'one'": ["--adapters", both, "--weights", '{"a": "one", "b": 1}'],
        "`combination_type` 'ties' needs `density`": ["--adapters", both, "--combination_type", "ties"],
        "Adapter 'z': malformed spec": ["--adapters", '{"z": "./no/such/folder"}'],
        f"Adapter 'f' ({tmp_path / 'flux'}) does not fit this base": [
            "--adapters",
            json.dumps({"f": str(tmp_path / "flux")}),
        ],
    }
    for message, args in cases.items():
        assert cli.main(base + args) == 2, message
        err = capsys.readouterr().err
        assert err.startswith(f"trl-diffusion-opd merge: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_check_merge_settings():
    assert check_merge_settings(["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert check_merge_settings(["a", "b"], 1) == {"a": 1.0, "b": 1.0}
    for kwargs, message in (
        ({"weights": {"a": 1}}, "no weight for adapter(s) ['b']"),
        ({"weights": 0}, "all zero"),
        ({"combination_type": "avg"}, "`combination_type` must be one of"),
        ({"combination_type": "cat", "density": 0.5}, "`density` is used by"),
        ({"combination_type": "ties", "density": 1.5}, "`density` must be a number in (0, 1]"),
        ({"combination_type": "cat", "svd_rank": 4}, "`svd_rank` is used by the *svd"),
    ):
        with pytest.raises(ValueError) as error:
            check_merge_settings(["a", "b"], **kwargs)
        assert message in str(error.value)


def test_factor_types_need_one_rank(adapters):
    with pytest.raises(ValueError, match="needs adapters of one rank, got ranks {'a': 2, 'c': 4}; use 'cat'"):
        merge_adapters(
            get_tiny_sd3_pipeline(with_t5=False), {"a": adapters["a"], "c": adapters["c"]}, 0.5, "ties", 0.5
        )


def test_student_started_from_a_merge_has_its_velocities(tmp_path, adapters):
    """`student_adapter` pointed at a merged folder: the DiffusionOPD student starts as the merge (its KL to the
    merge, as a teacher, is exactly zero; to the merged teachers it is not) and has the merge's rank."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    merge_adapters(pipe, {"a": adapters["a"], "c": adapters["c"]}, 0.5).save(tmp_path / "merged", pipe)
    teachers = {"a": adapters["a"], "c": adapters["c"], "merge": str(tmp_path / "merged")}
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=32,
        num_inference_steps=4,
        per_device_train_batch_size=3,
        max_sequence_length=1,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
        student_adapter=str(tmp_path / "merged"),
    )
    prompts = dict.fromkeys(teachers, PROMPTS)
    trainer = DiffusionOPDTrainer(get_tiny_sd3_pipeline(with_t5=False), teachers, args=args, train_dataset=prompts)
    assert trainer.peft_config.r == 6
    kl = trainer.compute_teacher_kl(prompts, seed=0)
    assert kl["merge"] == 0.0
    assert kl["a"] > 1e-6 and kl["c"] > 1e-6
