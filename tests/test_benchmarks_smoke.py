"""Smoke test of the benchmark code paths (`make bench`) on the tiny pipelines, in a few seconds."""

import json
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_state():
    """`benchmarks.common.setup` sets the thread count, warning filters and library log levels: undo it."""
    threads = torch.get_num_threads()
    loggers = {name: logging.getLogger(name).level for name in ("transformers", "diffusers", "peft", "accelerate")}
    tqdm = os.environ.get("TQDM_DISABLE")
    # One thread, as the benchmarks use: on a busy 2-core machine, multi-threaded kernels run 10x slower.
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        yield
    torch.set_num_threads(threads)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    if tqdm is None:
        os.environ.pop("TQDM_DISABLE", None)


def test_round_cost_measures_round_floor_and_audit():
    from benchmarks import round_cost

    result = round_cost.measure("sd3", num_tasks=2, num_steps=2, batch=1, rounds=1, size="tiny")
    for clock in ("wall", "cpu"):
        assert result[clock]["round_s"] > 0 and result[clock]["floor_s"] > 0
        assert result[clock]["ratio"] > 0
    # the trainer makes exactly the transformer calls the algorithm needs, and no VAE call
    assert result["audit"] == result["audit_expected"]
    assert result["audit"]["vae_calls"] == 0
    row = round_cost._row(result)
    assert len(row) == len(round_cost.HEADERS)


def test_grad_variance_estimators_agree_in_mean():
    from benchmarks import grad_variance

    with tempfile.TemporaryDirectory() as folder:
        s = grad_variance._Setup(0.7, num_steps=3, batch=1, folder=Path(folder))
        fixed = grad_variance.fixed_states(s, var_samples=4, mean_samples=4096)
        whole = grad_variance.whole_rollouts(s, rollouts=3)
        # the per-sample shortcut J^T dL/dmu equals autograd through the PPO loss
        m = s.means(s.rollout(0))
        sample = m["sample"]
        direct = s.ppo_grad(m, sample)
        h = torch.autograd.grad(
            grad_variance.transition.ppo_surrogate_loss(
                sample, m["mu_s"], m["mu_s"].detach(), m["mu_t"], m["std"]
            ).mean(),
            m["mu_s"],
            retain_graph=True,
        )[0]
        via_vjp = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(m["mu_s"], s.params, grad_outputs=h, retain_graph=True)]
        )
        torch.testing.assert_close(direct.float(), via_vjp, rtol=1e-4, atol=1e-6)
    assert fixed["cosine"] > 0.9
    assert fixed["total_var_closed_form"] < 1e-8 * max(fixed["total_var_ppo"], 1.0)
    assert whole["total_var_ppo"] > whole["total_var_closed_form"]


def test_convergence_run_and_plot(tmp_path):
    from benchmarks import convergence
    from benchmarks.plot import Panel, Series, save_line_plot

    common = {
        "resolution": 32,
        "num_inference_steps": 2,
        "per_device_train_batch_size": 1,
        "learning_rate": 1e-3,
        "kl_normalization": "paper",
        "guidance_scale": 1.0,
    }
    records = convergence.run_method({"noise_level": 0.7, "loss_type": "ppo"}, 2, 1, 0, common, tmp_path)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["kl"] > 0 for r in records)
    png = save_line_plot(
        [Panel("t", "rounds", "KL", [Series("a", [r["round"] for r in records], [r["kl"] for r in records])], True)],
        tmp_path / "plot.png",
    )
    assert png.stat().st_size > 1000


def test_gpu_round_tiny_and_results_files(tmp_path):
    from benchmarks import gpu_round
    from benchmarks.common import write_results

    data = gpu_round.main(["--tiny", "--no-write", "--rounds", "1", "--steps", "2", "--prompts-per-task", "1"])
    assert [p.get("gradient_checkpointing") for p in data["phases"]] == [False, True]
    assert all("error" not in p and p["wall"]["round_s"] > 0 for p in data["phases"])
    path = write_results("x", "X", {"a": 1}, {"b": 2}, "| h |\n|---|\n| 1 |", tmp_path, tmp_path / "R.md")
    assert json.loads(path.read_text())["b"] == 2
    assert "## X" in (tmp_path / "R.md").read_text()


def test_peak_memory_case_and_summary():
    import argparse

    from benchmarks import peak_memory

    # The benchmark's own path: a fresh process per case. Inside pytest's long-lived process the RSS high-water mark
    # says nothing (freed heap pages of earlier tests are reused without growing the RSS).
    ns = argparse.Namespace(preset="tiny", device="cpu", dtype="float32")
    result = peak_memory._run_in_subprocess("full_3_offload", ns)
    assert "error" not in result, result.get("error")
    assert result["tasks"] == 3 and result["offload"] is True
    assert result["round_peak_bytes"] is None  # no CUDA: the process RSS delta stands in
    assert result["process_rss_delta_bytes"] > 0 and result["measured_round_s"] > 0
    # the three full teachers stay frozen modules in host memory, each the size of the base
    assert result["resident_full_teacher_bytes_after"] == 3 * result["base_param_bytes"]
    fake = [
        {"case": "lora_1", "round_peak_bytes": 100, "process_rss_delta_bytes": 1},
        {"case": "lora_3", "round_peak_bytes": 105, "process_rss_delta_bytes": 1},
        {"case": "full_3", "round_peak_bytes": 300, "process_rss_delta_bytes": 1},
        {"case": "full_3_offload", "round_peak_bytes": 120, "process_rss_delta_bytes": 1},
    ]
    summary = peak_memory.summarize(fake)
    assert summary["lora_3_over_lora_1"] == pytest.approx(1.05)
    assert summary["full_3_offload_over_full_3"] == pytest.approx(0.4)


def test_released_loop_and_trainer_run_the_same_problem():
    from benchmarks import gpu_scale, released_loop

    device = torch.device("cpu")
    released = released_loop.run_case("released", "tiny", device, rounds=1)
    trainer = released_loop.run_case("trainer", "tiny", device, rounds=1)
    steps, tasks = released_loop.PRESETS["tiny"]["steps"], len(released_loop.TASKS)
    trained = int(steps * 0.99)
    # released: per task N rollout calls, N teacher calls (every step), T student micro-steps; a VAE decode
    assert released["calls_per_round"] == {
        "transformer_calls": tasks * (2 * steps + trained),
        "transformer_rows": tasks * (2 * steps + trained) * 2 - steps,  # B = 1; the geneval teacher has no CFG
        "vae_calls": tasks,
        "text_encoder_calls": 2 * tasks,
    }
    # the trainer (fused on-policy pass): T rollout calls that are the student's trained pass, one teacher call over
    # the T trained steps; no VAE
    assert trainer["calls_per_round"] == {"transformer_calls": tasks * (trained + 1), "vae_calls": 0}
    for result in (released, trainer):
        assert len(result["cpu_s"]) == 1 and result["cpu_s"][0] > 0 and result["images_per_round"] == tasks
    summary = released_loop.summarize([released, trainer])
    assert summary["cases"]["released"]["speedup"] == 1.0
    assert summary["cases"]["trainer"]["rounds_per_s"] == pytest.approx(1 / trainer["cpu_s"][0])
    assert "| released loop (re-creation) |" in released_loop.markdown([released, trainer], summary)
    assert callable(gpu_scale.main)


def test_wan_memory_counts_tokens_lora_and_checkpointed_activations():
    """`benchmarks.wan_memory` on the real Wan 2.1 1.3B config (meta device) at a small video: the video tokens, the
    student LoRA's exact size, and gradient checkpointing keeping far less than the full graph."""
    from benchmarks.wan_memory import model_sizes, saved_activations_per_row

    full = saved_activations_per_row("wan2.1-1.3B", resolution=64, num_frames=5)
    kept = saved_activations_per_row("wan2.1-1.3B", resolution=64, num_frames=5, checkpointing=True)
    assert full["tokens"] == kept["tokens"] == 2 * 4 * 4  # (5 - 1) / 4 + 1 frames x (64 / 8 / 2)^2
    wide = saved_activations_per_row("wan2.1-1.3B", resolution=(64, 96), num_frames=5, checkpointing=True)
    assert wide["tokens"] == 2 * 4 * 6 and wide["total_gib"] > kept["total_gib"]  # height x width: 64 / 16, 96 / 16
    # r32 on 8 attention projections (1536 x 1536) and the FFN (1536 <-> 8960) of each of the 30 blocks
    assert full["lora_params_m"] * 1e6 == 30 * (8 * 32 * (1536 + 1536) + 2 * 32 * (1536 + 8960))
    assert 0 < kept["total_gib"] < full["total_gib"] / 5
    assert model_sizes("wan2.1-1.3B")["transformer_params_b"] == pytest.approx(1.42, abs=0.01)


def test_world_ablation_records_rewards_and_ode_kl(tmp_path):
    from benchmarks import world_ablation

    settings = world_ablation.AblationSettings.quick()
    result = world_ablation.run_cached("PPO-style a=0.7", 3, settings, str(tmp_path))
    cached = tmp_path / "ppo-style-a-0-7-seed3" / "result.json"
    written = cached.stat().st_mtime_ns
    # a second call with the same settings reads the cached run back instead of training again
    assert world_ablation.run_cached("PPO-style a=0.7", 3, settings, str(tmp_path)) == result
    assert cached.stat().st_mtime_ns == written and result["seed"] == 3 and result["settings"]["seed"] == 3
    records = result["records"]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["kl"] > 0 and 0 <= r["average"] <= 1 for r in records)
    assert set(records[0]["rewards"]) == set(world_ablation.TASKS)
    # The evaluator measures the student, not the base: the ODE KL moves once the student is trained.
    assert records[2]["kl"] != records[0]["kl"]
    rising = [{"round": r, "v": v} for r, v in [(0, 0.0), (10, 0.5), (20, 1.0)]]
    assert world_ablation.rounds_to(rising, "v") == 18.0  # 90 % of the rise, interpolated
    png = world_ablation.plot([result], tmp_path / "curves.png")
    assert png.stat().st_size > 1000


def test_world_ablation_summary_over_seeds():
    from benchmarks import world_ablation

    def run(method, seed, averages, kls=(1.0, 0.5, 0.1)):
        records = [
            {"round": 10 * i, "average": a, "kl": k, "rewards": dict.fromkeys(world_ablation.TASKS, a)}
            for i, (a, k) in enumerate(zip(averages, kls))
        ]
        return {"method": method, "seed": seed, "records": records, "train_cpu_s": 10.0}

    ode, sde = "ODE (closed form)", "SDE a=0.3 (closed form)"
    results = [
        run(ode, 0, (0.6, 0.68, 0.70)),  # gain 0.10
        run(ode, 1, (0.5, 0.58, 0.60)),  # gain 0.10 from its own start
        run(sde, 0, (0.6, 0.64, 0.65)),  # gain 0.05: its own 90 % early, the common target never
        run(sde, 1, (0.5, 0.55, 0.59)),
    ]
    rows = {row["method"]: row for row in world_ablation.summarize(results)}
    assert list(rows) == [ode, sde]  # the order of METHODS
    assert rows[ode]["average"][:2] == pytest.approx((0.65, statistics.stdev([0.70, 0.60])))
    # common target: start + 0.9 x 0.10 (the best mean gain) = +0.09, reached at round 15 by both ODE seeds
    assert rows[ode]["common"] == pytest.approx((15.0, 0.0, 0))
    # SDE seed 1 reaches +0.09 at round 20 exactly; seed 0 never does (counted, not averaged in)
    assert rows[sde]["common"][0] == pytest.approx(20.0) and rows[sde]["common"][1:] == (None, 1)
    assert rows[sde]["own_reward"][0] == pytest.approx(statistics.fmean([15.0, 10 + 10 * 0.031 / 0.04]))
    assert rows[ode]["own_kl"][0] == pytest.approx(10 + 10 * (0.5 - 0.19) / 0.4)
    table = world_ablation.to_markdown(list(rows.values()))
    assert "20.0 (1 not reached)" in table and "0.650 ± 0.071" in table


def test_long_run_probe_and_summary():
    from benchmarks import long_run

    result = long_run.run_child(rounds=3, mark=2)
    assert result["rounds"] == 3 and result["wall_s"] > 0 and result["peak_rss_bytes"] > 0
    assert result["at_start"]["round"] == 0 and result["at_mark"]["round"] == 2 and result["at_end"]["round"] == 3
    assert [round_ for round_, _ in result["rss_trace"]] == [2]
    # the tiny config's 10 training and 4 held-out prompts and the empty negative, embedded once (cache of 1024)
    assert result["max_prompt_cache_entries"] == 15 and result["prompt_cache_size"] == 1024
    # the EMA tracks the student LoRA: as many tensors at the end as at round 2
    assert result["at_end"]["ema_tensors"] == result["at_mark"]["ema_tensors"] > 0
    assert result["at_end"]["metric_keys"] == 0  # the final log cleared `_metrics`
    assert result["max_metric_values"] > 0
    assert result["at_end"]["log_history_entries"] == 1  # logging every 10 rounds: only the final summary
    fake_short = {"peak_rss_bytes": 1000, "cuda_peak_bytes": None, "at_mark": None, "at_end": None}
    fake_long = {
        "peak_rss_bytes": 1040,
        "cuda_peak_bytes": None,
        "at_mark": {"rss_bytes": 900},
        "at_end": {"rss_bytes": 990},
        "rss_trace": [(50, 900), (100, 950), (150, 1000)],
    }
    summary = long_run.summarize(fake_short, fake_long)
    assert summary["peak_rss_ratio"] == pytest.approx(1.04) and summary["cuda_peak_ratio"] is None
    assert summary["rss_end_over_mark"] == pytest.approx(1.1) and summary["within_target"] is True
    assert summary["rss_slope_bytes_per_round"] == pytest.approx(1.0)
    assert long_run.summarize(fake_short, {**fake_long, "peak_rss_bytes": 1060})["within_target"] is False


def test_klein_final_latents_records_every_step_and_the_pipeline_latents():
    from benchmarks import klein_final_latents

    result = klein_final_latents.run("flux2_klein", "eps 1e-12, fraction 0.99", seed=0, rounds=1)
    # klein's shifted 4-step schedule at 32 px: the last step, 0.70 -> 0, is the one `timestep_fraction=0.99` skips
    assert result["sigmas"][-2] == pytest.approx(0.7007, abs=1e-4) and result["trained_steps"] == 3
    for task in result["tasks"].values():
        before, after = task["kl_step_before"], task["kl_step_after"]
        assert len(before) == len(after) == 4 and min(before) > 0
        # The trainer's KL is the mean over the trained steps of the all-steps KL, on the same rollouts.
        assert task["kl_drop_trained"] == pytest.approx(1 - sum(after[:3]) / sum(before[:3]), rel=1e-4)
        # ... and the untrained last step holds most of the initial KL (87-92 % over pipeline seeds 0-2).
        assert task["last_step_share_before"] > 0.8
        assert -1 < task["latent_distance_drop"] < 1 and task["latent_distance_drop"] != 0
    # The tiny klein's LoRA-B gradients are below AdamW's default eps 1e-8 (median 5.6e-10 in the first round).
    assert 0 < result["adam_sqrt_v"] < 1e-8


def test_teacher_scale_case_and_summary(tmp_path):
    from benchmarks import teacher_scale

    paths = teacher_scale.save_teachers("tiny", tmp_path, 5)
    result = teacher_scale.run_case("tiny", paths, "host", budget=2, rows=2, tasks_per_round=2, rounds=1)
    assert result["teachers"] == 5 and len(result["round_s_all"]) == 1 and result["round_s"] > 0
    # at most the budget of teachers on the device, each as large as any other toy teacher
    assert 0 < result["teacher_bytes_on_device"] <= 2 * result["adapter_bytes"]
    assert result["host_copies"] >= 2
    fake = [
        {**result, "placement": "device", "teachers": n, "round_s": s, "round_cpu_s": s, "peak_bytes": m}
        for n, s, m in [(3, 1.0, 100), (200, 1.1, 100 + 197 * result["adapter_bytes"])]
    ]
    summary = teacher_scale.summarize(fake)["device"]
    assert summary["time_ratio_max"] == pytest.approx(1.1) and summary["time_target_met"]
    assert summary["memory_target_met"]
    assert len(teacher_scale._row(fake[1])) == len(teacher_scale.HEADERS)
    # several processes per case: rounds pooled, the least peak read against the target, the median shown
    runs = [
        {**result, "peak_bytes": m, "round_s_all": [s], "round_cpu_s_all": [s]} for m, s in [(7, 1), (5, 3), (9, 2)]
    ]
    merged = teacher_scale._merge_runs(runs)
    assert (merged["peak_bytes"], merged["peak_bytes_median"], merged["round_s"]) == (5, 7, 2)
    # a CPU's host copies are in the measured memory: the host placement is allowed the extra teachers' bytes there
    hosted = teacher_scale.summarize([{**f, "placement": "host", "device": "cpu"} for f in fake])["host"]
    assert hosted["memory_target_met"]
    on_gpu = teacher_scale.summarize([{**f, "placement": "host", "device": "cuda:0"} for f in fake])["host"]
    assert not on_gpu["memory_target_met"]


def test_wan_memory_counts_the_image_to_video_checkpoints():
    """The I2V variants on the published configs: Wan 2.1 I2V 14B's transformer (36 input channels, CLIP key / value
    projections) and CLIP ViT-H image encoder, Wan 2.2 I2V A14B's two experts; at a small video, the CLIP tokens' extra
    attention (2.1) and TI2V's per-token time modulation (a first frame) keep more than the text-to-video rows."""
    from benchmarks.wan_memory import model_sizes, saved_activations_per_row

    i2v = model_sizes("wan2.1-I2V-14B")
    assert i2v["transformer_params_b"] == pytest.approx(16.40, abs=0.01)
    assert i2v["image_encoder_params_b"] == pytest.approx(0.63, abs=0.01)
    a14b = model_sizes("wan2.2-I2V-A14B")
    assert a14b["transformer_params_b"] == pytest.approx(28.58, abs=0.01) and a14b["image_encoder_params_b"] == 0
    for image, text in (("wan2.1-I2V-14B", "wan2.1-14B"), ("wan2.2-TI2V-5B-I2V", "wan2.2-TI2V-5B")):
        with_frame, without = (
            saved_activations_per_row(v, resolution=64, num_frames=5, checkpointing=True) for v in (image, text)
        )
        assert with_frame["tokens"] == without["tokens"]
        assert with_frame["distinct_without_attention_probs_gib"] > without["distinct_without_attention_probs_gib"]
