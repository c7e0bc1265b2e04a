"""The released DiffusionOPD training loop as a baseline, beside `DiffusionOPDTrainer` on the same problem.

A re-creation of the structure of the released `scripts/train_sd3_opd.py` (Li et al., 2026), not its code: per round
and per task, (1) the prompts go through the text encoder, (2) the student samples the trajectory with CFG through
the sampler loop, (3) the VAE decodes the final latents and a proxy reward scores the images in a worker thread
(monitoring only), (4) the task's teacher gives its transition mean at *every* sampler step (N calls of B rows, x2
with CFG), stored in float32; then training: for each batch and each trained step j < T = int(0.99 N), one student
micro-step (forward with CFG at 2B rows, per-step closed-form KL, backward), gradients accumulated over all of them,
clipped, one optimizer step per round, and an EMA of the student every 8 rounds. Precision as released: float32
weights (base and LoRA) under fp16 autocast with a gradient scaler on CUDA; on a CPU both loops run in float32.

`DiffusionOPDTrainer` runs the same problem: same transformer, teachers, prompts, N, T, CFG and student LoRA, with
its own round (cached prompt embeddings, no VAE, teacher means only at trained steps, trained steps batched by
`step_batch_size`), on a bf16 base with float32 LoRA on CUDA and in float32 on a CPU.

Each case runs in a fresh process (peak memory: `torch.cuda.max_memory_allocated` over the measured rounds on CUDA;
peak RSS minus the RSS before the model was built on a CPU). Times: median over the timed rounds after one warm-up
round, process CPU time on a CPU (robust to other processes on a shared machine) and wall time.

    python -m benchmarks.released_loop                 # small SD3 on the CPU, writes results and RESULTS.md
    python -m benchmarks.released_loop --preset tiny --no-write    # seconds
    python -m benchmarks.gpu_scale                     # SD3.5-Medium size on one GPU (same code)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import torch


RESULT_TAG = "[released_loop:result]"
TASKS = ["geneval", "ocr", "aes"]
TEACHER_GUIDANCE = {"geneval": 1.0, "ocr": 4.5, "aes": 4.5}  # the released recipe's teacher CFG per task
STUDENT_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]
STUDENT_TARGETS += ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
# tiny: seconds (smoke test); small: the small SD3 (4 blocks, hidden 256, 32x32 latents); sd35m: SD3.5-Medium
PRESETS = {
    "tiny": {"model": "tiny", "resolution": 64, "steps": 3, "prompts_per_task": 1, "seq": 4, "rounds": 1},
    "small": {"model": "small", "resolution": 256, "steps": 10, "prompts_per_task": 3, "seq": 8, "rounds": 2},
    "sd35m": {"model": "sd35m", "resolution": 512, "steps": 10, "prompts_per_task": 3, "seq": 128, "rounds": 3},
}
# trainer cases: `_step1` sets step_batch_size=1 (None otherwise), `_two_pass` turns the fused on-policy pass off
CASES = ("released", "trainer", "trainer_step1", "trainer_two_pass", "trainer_step1_two_pass")
VAE_CONFIGS = {  # SD3's VAE (16 latent channels, 8x) and a narrow one of the same shape for the CPU presets
    "sd35m": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32},
    "small": {"block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8},
    "tiny": {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _transformer_config(model: str) -> dict:
    from .gpu_round import SD35_MEDIUM, TINY
    from .peak_memory import transformer_config

    return {"tiny": dict(TINY), "small": transformer_config("small"), "sd35m": dict(SD35_MEDIUM)}[model]


def build(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The pipeline (random transformer, random VAE, text encoders replaced by seeded random embeddings of the real
    shapes) and one random r32 LoRA teacher per task saved in a temporary folder. Returns `(pipe, teachers, folder)`."""
    from diffusers import AutoencoderKL

    from trl_diffusion_opd.families.sd3 import SD3Family

    from .gpu_round import RandomPromptEmbeddings, build_pipeline, save_random_lora

    settings = PRESETS[preset]
    config = _transformer_config(settings["model"])
    pipe = build_pipeline(config, device, dtype, seed=seed)
    vae = VAE_CONFIGS[settings["model"]]
    torch.manual_seed(seed + 7)
    with torch.device(device):
        pipe.vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=vae["block_out_channels"],
            norm_num_groups=vae["norm_num_groups"],
            layers_per_block=2,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
    pipe.vae.requires_grad_(False)
    pipe.encode_prompt = RandomPromptEmbeddings(pipe.transformer, settings["seq"])
    folder = tempfile.mkdtemp(prefix="released_loop_")
    teachers = {
        task: str(save_random_lora(pipe.transformer, Path(folder) / task, SD3Family.default_lora_targets, 32, i))
        for i, task in enumerate(TASKS)
    }
    return pipe, teachers, folder


def preset_trainer(preset: str, pipe, teachers, folder, peft_config, **kwargs):
    """`make_trainer` on `preset`'s problem (its resolution, steps, prompts, sequence length; CFG 4.5), no evaluation
    prompts, on the CPU unless `use_cpu` says otherwise; `kwargs` are more config fields."""
    from .common import make_trainer

    settings = PRESETS[preset]
    defaults = {
        "peft_config": peft_config,
        "eval_prompts": {},
        "train_prompts": _prompts(preset),
        "resolution": settings["resolution"],
        "num_inference_steps": settings["steps"],
        "per_device_train_batch_size": settings["prompts_per_task"],
        "max_sequence_length": settings["seq"],
        "guidance_scale": 4.5,
        "use_cpu": True,
    }
    return make_trainer(pipe, teachers, str(Path(folder) / "out"), **{**defaults, **kwargs})


def _prompts(preset: str) -> dict[str, list[str]]:
    from .gpu_round import PROMPTS

    return {task: PROMPTS[task][: PRESETS[preset]["prompts_per_task"]] for task in TASKS}


# ---------------------------------------------------------------------------------------------- the released loop
class ReleasedLoop:
    """The released training loop's structure on a diffusers SD3 pipeline (see the module docstring).

    Args:
        pipe: The pipeline; its transformer gets the student (`default`) and the teachers (`teacher_<task>`) as PEFT
            adapters, as the released script loads them.
        teachers: `{task: LoRA folder}`.
        preset: Sizes (`PRESETS`).
        autocast: `torch.float16` (released, CUDA) or `None` (float32).
    """

    def __init__(self, pipe, teachers: dict[str, str], preset: str, autocast: torch.dtype | None = None, seed=0):
        from peft import LoraConfig

        self.pipe, self.settings = pipe, PRESETS[preset]
        self.device = pipe.transformer.device
        self.autocast = autocast
        transformer = pipe.transformer
        transformer.to(torch.float32)  # released: the transformer keeps from_pretrained's float32 weights
        torch.manual_seed(seed)
        config = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=STUDENT_TARGETS)
        transformer.add_adapter(config, adapter_name="default")
        for task, path in teachers.items():
            pipe.load_lora_weights(path, adapter_name=f"teacher_{task}")
        for name, param in transformer.named_parameters():
            param.requires_grad_(".default." in name)
        transformer.set_adapter("default")
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=3e-4, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
        self.ema = [p.detach().clone() for p in self.params]
        self.executor = futures.ThreadPoolExecutor(max_workers=8)
        from trl_diffusion_opd.rewards import get_reward

        self.reward = get_reward("brightness")
        self.prompts = _prompts(preset)
        self.round_index = 0
        self.counts = {"transformer_calls": 0, "transformer_rows": 0, "vae_calls": 0, "text_encoder_calls": 0}

    def _autocast(self):
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _velocity(self, x, t, embeds, pooled, neg_embeds, neg_pooled, guidance):
        """The transformer's CFG velocity at `x` `(B, C, H, W)` and scheduler timesteps `t` `(B,)`."""
        transformer = self.pipe.transformer
        if guidance > 1:
            out = transformer(
                hidden_states=torch.cat([x] * 2),
                timestep=torch.cat([t] * 2),
                encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                pooled_projections=torch.cat([neg_pooled, pooled]),
                return_dict=False,
            )[0]
            uncond, cond = out.chunk(2)
            rows = 2 * x.shape[0]
            out = uncond + guidance * (cond - uncond)
        else:
            out = transformer(
                hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
            )[0]
            rows = x.shape[0]
        self.counts["transformer_calls"] += 1
        self.counts["transformer_rows"] += rows
        return out

    def _encode(self, prompts):
        self.counts["text_encoder_calls"] += 1
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device)
        return embeds.float(), pooled.float()

    @torch.no_grad()
    def sample(self, task: str) -> dict:
        """One sampling batch of the released loop: encode, roll out with CFG, decode + proxy reward, teacher means."""
        s = self.settings
        prompts = self.prompts[task]
        batch = len(prompts)
        embeds, pooled = self._encode(prompts)
        neg_embeds, neg_pooled = self._encode([""] * batch)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(s["steps"], device=self.device)
        sigmas, timesteps = scheduler.sigmas.float(), scheduler.timesteps.float()
        side = s["resolution"] // self.pipe.vae_scale_factor
        generator = torch.Generator().manual_seed(10_000 * self.round_index + TASKS.index(task))
        x = torch.randn(batch, 16, side, side, generator=generator).to(self.device)
        latents = [x]
        with self._autocast():
            for j in range(s["steps"]):
                v = self._velocity(x, timesteps[j].expand(batch), embeds, pooled, neg_embeds, neg_pooled, 4.5)
                x = x + (sigmas[j + 1] - sigmas[j]) * v.float()  # ODE (noise level 0): the step is its mean
                latents.append(x)
            vae = self.pipe.vae
            images = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
            self.counts["vae_calls"] += 1
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        monitor = self.executor.submit(self._proxy_reward, images.cpu(), prompts)
        latents = torch.stack(latents, dim=1)  # (B, N + 1, C, H, W)
        guidance = TEACHER_GUIDANCE[task]
        means = []
        self.pipe.transformer.set_adapter(f"teacher_{task}")
        with self._autocast():
            for j in range(s["steps"]):  # every sampler step, as released (only T = int(0.99 N) are trained)
                v = self._velocity(
                    latents[:, j], timesteps[j].expand(batch), embeds, pooled, neg_embeds, neg_pooled, guidance
                )
                means.append(latents[:, j] + (sigmas[j + 1] - sigmas[j]) * v.float())
        self.pipe.transformer.set_adapter("default")
        return {
            "embeds": embeds,
            "pooled": pooled,
            "neg_embeds": neg_embeds,
            "neg_pooled": neg_pooled,
            "latents": latents[:, :-1],
            "timesteps": timesteps[: s["steps"]],
            "sigmas": sigmas,
            "teacher_means": torch.stack(means, dim=1).float(),
            "monitor": monitor,
        }

    def _proxy_reward(self, images: torch.Tensor, prompts):
        from PIL import Image

        pils = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")) for img in images]
        return self.reward(pils, prompts)

    def round(self) -> float:
        """One round: a sampling batch per task, then one student micro-step per (batch, trained step), accumulated
        into one optimizer step. Returns the mean loss."""
        samples = [self.sample(task) for task in TASKS]
        for sample in samples:
            sample["reward"] = sample.pop("monitor").result()  # waited for before training, as released
        num_train = int(self.settings["steps"] * 0.99)
        micro_steps = len(samples) * num_train
        total = 0.0
        self.pipe.transformer.train()
        for sample in samples:
            batch = sample["latents"].shape[0]
            for j in range(num_train):
                with self._autocast():
                    v = self._velocity(
                        sample["latents"][:, j],
                        sample["timesteps"][j].expand(batch),
                        sample["embeds"],
                        sample["pooled"],
                        sample["neg_embeds"],
                        sample["neg_pooled"],
                        4.5,
                    )
                sigmas = sample["sigmas"]
                mean = sample["latents"][:, j].float() + (sigmas[j + 1] - sigmas[j]) * v.float()
                delta = mean - sample["teacher_means"][:, j]
                loss = (0.5 * delta**2).mean(dim=(1, 2, 3)).mean() / micro_steps
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.pipe.transformer.eval()
        self.round_index += 1
        if self.round_index % 8 == 0:  # EMA decay 0.9, every 8 steps
            for shadow, param in zip(self.ema, self.params):
                shadow.lerp_(param.detach(), 0.1)
        return total


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rounds(run_round, device: torch.device, rounds: int) -> dict:
    """One warm-up round, then `rounds` timed ones; the CUDA peak is reset after the warm-up."""
    run_round()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        run_round()
        _sync(device)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu}


def run_case(case: str, preset: str, device: torch.device, rounds: int | None = None) -> dict:
    """One case in this process: build, one warm-up round, `rounds` timed rounds. Returns times and memory."""
    import shutil

    baseline_rss = _rss_bytes()
    settings = PRESETS[preset]
    rounds = rounds or settings["rounds"]
    cuda = device.type == "cuda"
    # The released loop keeps float32 weights under fp16 autocast; the trainer a bf16 base (float32 on a CPU).
    dtype = torch.bfloat16 if cuda and case != "released" else torch.float32
    pipe, teachers, folder = build(preset, device, dtype)
    try:
        if case == "released":
            loop = ReleasedLoop(pipe, teachers, preset, autocast=torch.float16 if cuda else None)
            times = _timed_rounds(loop.round, device, rounds)
            counts = {k: v / (rounds + 1) for k, v in loop.counts.items()}
        else:
            from peft import LoraConfig

            lora = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=STUDENT_TARGETS)
            trainer = preset_trainer(
                preset,
                pipe,
                teachers,
                folder,
                lora,
                teacher_guidance_scale=TEACHER_GUIDANCE,
                step_batch_size=1 if "_step1" in case else None,
                fused_rollout="_two_pass" not in case,
                gradient_checkpointing=cuda and settings["model"] == "sd35m",
                use_cpu=not cuda,
                learning_rate=3e-4,
                max_steps=rounds + 1,
            )
            calls = {"transformer_calls": 0, "vae_calls": 0}
            velocity = trainer.family.velocity
            trainer.family.velocity = lambda *a, **k: (
                calls.__setitem__("transformer_calls", calls["transformer_calls"] + 1) or velocity(*a, **k)
            )
            decode = pipe.vae.decode
            pipe.vae.decode = lambda *a, **k: calls.__setitem__("vae_calls", calls["vae_calls"] + 1) or decode(*a, **k)
            times = _TrainerClock(device, trainer, rounds).run()
            counts = {k: v / (rounds + 1) for k, v in calls.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    peak_rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _rss_bytes())
    images = len(TASKS) * settings["prompts_per_task"]
    return {
        "case": case,
        "preset": preset,
        "device": str(device),
        "dtype": "fp32 weights, fp16 autocast" if case == "released" and cuda else str(dtype).replace("torch.", ""),
        "rounds": rounds,
        "images_per_round": images,
        **times,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else peak_rss - baseline_rss,
        "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS - RSS before build",
        "calls_per_round": counts,
    }


class _TrainerClock:
    """Runs `trainer.train()` for 1 + `rounds` rounds, timing each round after the first."""

    def __init__(self, device, trainer, rounds):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1 and device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                clock.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                _sync(device)
                if state.global_step >= 2:
                    clock.wall.append(time.perf_counter() - clock.start[0])
                    clock.cpu.append(time.process_time() - clock.start[1])

        self.trainer, self.wall, self.cpu = trainer, [], []
        trainer.add_callback(Callback())

    def run(self) -> dict:
        self.trainer.train()
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def _run_in_subprocess(case: str, preset: str, device: str, rounds: int | None) -> dict:
    command = [sys.executable, "-m", "benchmarks.released_loop", "--worker", case, "--preset", preset]
    command += ["--device", device] + (["--rounds", str(rounds)] if rounds else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"case {case} failed:\n{result.stderr[-3000:]}")


def summarize(results: list[dict]) -> dict:
    """Rounds/s, images/s and peak memory per case, and each trainer case's ratios to the released loop."""
    from .common import median

    clock = "wall_s" if results[0]["device"].startswith("cuda") else "cpu_s"
    rows = {}
    for r in results:
        round_s = median(r[clock])
        rows[r["case"]] = {
            "round_s": round_s,
            "rounds_per_s": 1 / round_s,
            "images_per_s": r["images_per_round"] / round_s,
            "peak_gib": r["peak_bytes"] / 2**30,
            "wall_round_s": median(r["wall_s"]),
        }
    base = rows["released"]
    for row in rows.values():
        row["speedup"] = row["rounds_per_s"] / base["rounds_per_s"]
        row["memory_ratio"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] > 0 else float("nan")
    return {"clock": clock, "cases": rows}


def _label(case: str) -> str:
    if case == "released":
        return "released loop (re-creation)"
    sizes = "step_batch_size=1" if "_step1" in case else "step_batch_size=None"
    return f"DiffusionOPDTrainer ({sizes}, {'two-pass' if '_two_pass' in case else 'fused'})"


def markdown(results: list[dict], summary: dict) -> str:
    from .common import markdown_table

    headers = ["loop", "precision", "round (s)", "rounds/s", "images/s", "speedup vs released", "peak memory (GiB)"]
    headers += ["memory vs released", "transformer calls / round", "VAE calls / round"]
    rows = []
    for r in results:
        s = summary["cases"][r["case"]]
        rows.append(
            [
                _label(r["case"]),
                r["dtype"],
                s["round_s"],
                s["rounds_per_s"],
                s["images_per_s"],
                f"**{s['speedup']:.2f}x**",
                s["peak_gib"],
                f"{s['memory_ratio']:.2f}",
                r["calls_per_round"]["transformer_calls"],
                r["calls_per_round"]["vae_calls"],
            ]
        )
    clock = "process CPU time (one torch thread)" if summary["clock"] == "cpu_s" else "wall clock (synchronised)"
    first = results[0]
    return (
        f"Round = 3 tasks x {first['images_per_round'] // 3} prompts, one optimizer step; median over "
        f"{first['rounds']} timed rounds after one warm-up round, on the {clock}; each loop in a fresh process. Peak "
        f"memory: {first['peak_kind']}. The released loop re-encodes the prompts (random embeddings stand in for the "
        "text encoders in both loops, so that cost is not counted), decodes every rollout with the VAE and scores it "
        "with a proxy reward in a thread, computes teacher means at all N steps and trains one step per micro-step; "
        "the trainer caches embeddings, runs no VAE, computes teacher means at the T trained steps only and batches "
        "them.\n\n" + markdown_table(headers, rows)
    )


def main(argv=None) -> dict:
    from .common import setup, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=None, help="Timed rounds per case (after one warm-up).")
    parser.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="The tiny preset, nothing written.")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = ns.preset or ("tiny" if ns.quick else "sd35m" if device == "cuda" else "small")
    setup()
    if ns.worker:
        result = run_case(ns.worker, preset, torch.device(device), ns.rounds)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    if "released" not in ns.cases:
        ns.cases = ["released", *ns.cases]
    results = [_run_in_subprocess(case, preset, device, ns.rounds) for case in ns.cases]
    summary = summarize(results)
    for case, row in summary["cases"].items():
        print(
            f"[released_loop] {case}: {row['round_s']:.3f} s/round, {row['images_per_s']:.3f} images/s, "
            f"{row['speedup']:.2f}x released, peak {row['peak_gib']:.3f} GiB ({row['memory_ratio']:.2f}x)",
            flush=True,
        )
    if not (ns.no_write or ns.quick):
        name = "released_loop" if device == "cpu" else f"released_loop_{preset}_{device}"
        config = {"preset": preset, **PRESETS[preset], "device": device, "tasks": len(TASKS), "cfg": 4.5}
        title = f"Released DiffusionOPD loop vs DiffusionOPDTrainer ({preset}, {device})"
        write_results(name, title, config, {"results": results, "summary": summary}, markdown(results, summary))
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    main()
