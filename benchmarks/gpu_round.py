"""Issue #7, item 5: one DiffusionOPD round at SD3.5-Medium size on one GPU.

Builds an `SD3Transformer2DModel` from SD3.5-Medium's published config with random weights (no download), in bf16,
inside a `StableDiffusion3Pipeline` without text encoders or VAE: prompt embeddings are random tensors of the real
shapes (CLIP 77 tokens + T5 `max_sequence_length` tokens of width 4096, pooled 2048), fixed per prompt. Three random
LoRA teachers (r32 on the eight attention projections, one per task) and the student LoRA (r32/alpha64, the
paper's) ride on the shared base. The paper's recipe: 512 px, 10 steps (9 trained), 3 prompts per task, student CFG
4.5, teacher CFG GenEval 1.0 / OCR 4.5 / Aes 4.5, ODE sampler, EMA.

Two phases, each timed with `benchmarks.round_cost.measure_trainer` (one warm-up round, then timed rounds, each
followed by its floor of passes measured alone):

1. no gradient checkpointing, with the largest `step_batch_size` of `--step-batch-sizes` that fits in memory
   (`auto`: the largest that the saved-activation estimate of `benchmarks.memory` fits in 80% of the free GPU memory,
   then 1 as a fallback);
2. gradient checkpointing, with the largest of `--gc-step-batch-sizes` that fits (None = all trained steps in one call).

Reported per phase: round time, floor, ratio, peak GPU memory; on CUDA also the host-device synchronisations of the
(untimed) warm-up round (`torch.cuda.set_sync_debug_mode("warn")`), grouped by source line: each one stalls the CPU
until the GPU queue drains, exposing the Python time of the next step.

    python benchmarks/gpu_round.py            # on one H100/H200, < 5 minutes
    python benchmarks/gpu_round.py --tiny     # CPU smoke check of the same code path (tiny model, seconds)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


if __package__ in (None, ""):  # `python benchmarks/gpu_round.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402

from benchmarks.common import make_trainer, markdown_table, setup, write_results  # noqa: E402
from benchmarks.memory import saved_activations_per_row  # noqa: E402
from benchmarks.round_cost import measure_trainer  # noqa: E402
from trl_diffusion_opd.families.sd3 import SD3Family  # noqa: E402


# Published SD3.5-Medium transformer config (shared/reference/model_configs.md).
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# The same structure (dual attention, RMS qk-norm, 16 latent channels) at a size a CPU runs in seconds.
TINY = {
    **SD35_MEDIUM,
    "sample_size": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
}
CLIP_TOKENS = 77
TASKS = ["geneval", "ocr", "aes"]
TEACHER_GUIDANCE = {"geneval": 1.0, "ocr": 4.5, "aes": 4.5}
PROMPTS = {
    "geneval": ["a photo of a red bench and a blue cup", "a photo of three dogs", "a cat left of a bicycle"],
    "ocr": ['a sign that says "open late"', 'a mug printed with "hello"', 'a book titled "night"'],
    "aes": ["a misty forest at dawn", "a portrait in golden light", "a quiet harbour at dusk"],
}


def build_pipeline(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StableDiffusion3Pipeline:
    """A pipeline around a randomly initialised transformer, built directly on `device`; no text encoders, no VAE
    (`vae_scale_factor` is then 8, SD3's)."""
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config)
    transformer.to(dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_lora(transformer, folder: Path, targets: list[str], rank: int, seed: int, scale: float = 0.02):
    """A random LoRA (A ~ N(0, 1/in), B ~ N(0, scale^2)) for every Linear module matching `targets`, saved in
    diffusers' format, without copying the model."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) or name == t for t in targets):
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=generator) * scale
            state[f"{name}.lora_A.weight"] = a
            state[f"{name}.lora_B.weight"] = b
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
    )
    return folder


class RandomPromptEmbeddings:
    """Stands in for the text encoders as the pipeline's `encode_prompt`: fixed random embeddings of the real shapes
    (CLIP 77 tokens + T5 `max_sequence_length` tokens of width `joint_attention_dim`; pooled), seeded by the prompt.
    Installed on the pipeline before the trainer is built, so the trainer's own prompt path (family, prompt cache)
    is the one that runs."""

    def __init__(self, transformer, max_sequence_length: int):
        config = transformer.config
        self.transformer = transformer
        self.default_length = max_sequence_length
        self.width, self.pooled = config.joint_attention_dim, config.pooled_projection_dim

    def __call__(self, prompt, *args, device=None, max_sequence_length=None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        length = CLIP_TOKENS + (max_sequence_length or self.default_length)
        embeds, pooled = [], []
        for text in prompts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2**63)
            generator = torch.Generator().manual_seed(seed)
            embeds.append(torch.randn(1, length, self.width, generator=generator))
            pooled.append(torch.randn(1, self.pooled, generator=generator))
        param = next(self.transformer.parameters())
        device = device or param.device
        embeds = torch.cat(embeds).to(device, param.dtype)
        pooled = torch.cat(pooled).to(device, param.dtype)
        return embeds, None, pooled, None


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_phase(trainer, device, checkpointing: bool, step_batch_sizes, warmup, rounds, deadline) -> dict:
    transformer = trainer.accelerator.unwrap_model(trainer.model)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    last_error = None
    for size in step_batch_sizes:
        trainer.args.step_batch_size = size
        _reset_memory(device)
        try:
            result = measure_trainer(trainer, warmup, rounds, deadline=deadline, audit_syncs=True)
        except Exception as error:  # an OOM: try the next (smaller) chunk size
            if not _is_oom(error):
                raise
            last_error = f"step_batch_size={size}: out of memory"
            print(f"[gpu_round] {'GC' if checkpointing else 'no GC'} {last_error}, trying a smaller one", flush=True)
            trainer.model.zero_grad(set_to_none=True)
            continue
        result["peak_memory_gb"] = _peak_memory_gb(device)
        result["gradient_checkpointing"] = checkpointing
        result.setdefault("syncs", {})
        return result
    return {"gradient_checkpointing": checkpointing, "error": last_error or "no step_batch_size given"}


def _parse_sizes(text: str) -> list[int | None]:
    return [None if s.strip().lower() == "none" else int(s) for s in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny transformer of the same structure (CPU smoke).")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="Default: bf16 on GPU."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Default 512 (128 with --tiny).")
    parser.add_argument("--steps", type=int, default=None, help="Sampler steps N. Default 10 (4 with --tiny).")
    parser.add_argument("--prompts-per-task", type=int, default=3)
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens. Default 128 (8 tiny).")
    parser.add_argument("--rank", type=int, default=32, help="Teacher LoRA rank (the student is r32/alpha64).")
    parser.add_argument("--rounds", type=int, default=2, help="Timed rounds per phase (after one warm-up).")
    parser.add_argument(
        "--step-batch-sizes", default="auto", help="Candidates without checkpointing, largest first, or 'auto'."
    )
    parser.add_argument("--gc-step-batch-sizes", default="None,3", help="Candidates with checkpointing.")
    parser.add_argument(
        "--budget", type=float, default=270.0, help="Seconds for the whole script; stops timing early."
    )
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args(argv)

    start = time.perf_counter()
    deadline_all = start + ns.budget
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup(1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    dtype = getattr(torch, ns.dtype) if ns.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = TINY if ns.tiny else SD35_MEDIUM
    resolution = ns.resolution or (128 if ns.tiny else 512)
    steps = ns.steps or (4 if ns.tiny else 10)
    msl = ns.max_sequence_length or (8 if ns.tiny else 128)

    pipe = build_pipeline(config, device, dtype)
    transformer = pipe.transformer
    pipe.encode_prompt = RandomPromptEmbeddings(transformer, msl)  # no text encoders: random embeddings
    params_b = sum(p.numel() for p in transformer.parameters()) / 1e9  # before any adapter
    build_s = time.perf_counter() - start
    print(
        f"[gpu_round] {params_b * 1e3:.1f}M-parameter transformer built on {device} ({dtype}) in {build_s:.1f}s",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        teachers = {
            task: str(save_random_lora(transformer, Path(folder) / task, SD3Family.default_lora_targets, ns.rank, i))
            for i, task in enumerate(TASKS)
        }
        trainer = make_trainer(
            pipe,
            teachers,
            str(Path(folder) / "out"),
            eval_prompts={},
            train_prompts=PROMPTS,
            resolution=resolution,
            num_inference_steps=steps,
            per_device_train_batch_size=ns.prompts_per_task,
            max_sequence_length=msl,
            guidance_scale=4.5,
            teacher_guidance_scale=TEACHER_GUIDANCE,
            noise_level=0.0,
            learning_rate=3e-4,
            ema=True,
            use_cpu=device.type == "cpu",
        )
    static_gb = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    estimate = {
        gc: saved_activations_per_row(config, resolution, CLIP_TOKENS + msl, dtype, checkpointing=gc)
        for gc in (False, True)
    }
    rows_per_step = ns.prompts_per_task * 2  # student CFG doubles the rows
    trained = trainer.args.num_train_timesteps
    no_gc_sizes = ns.step_batch_sizes
    if no_gc_sizes == "auto":
        if device.type == "cuda":
            free_gb = torch.cuda.mem_get_info(device)[0] / 2**30
            per_step = estimate[False]["without_attention_probs_gib"] * rows_per_step
            fit = max(1, min(trained, int(0.8 * free_gb // per_step)))
        else:
            fit = 2  # the CPU smoke check: chunks of unequal size (2 + 1 trained steps with --tiny)
        no_gc_sizes = ",".join(str(n) for n in dict.fromkeys([fit, 1]))
    print(
        f"[gpu_round] saved activations per student row (estimate): {estimate[False]['without_attention_probs_gib']:.3g}"
        f" GiB without checkpointing (+{estimate[False]['attention_probs_gib']:.3g} GiB of attention probabilities "
        f"on the math path), {estimate[True]['total_gib']:.3g} GiB with; no-GC candidates {no_gc_sizes}",
        flush=True,
    )
    phases = []
    for checkpointing, sizes in ((False, no_gc_sizes), (True, ns.gc_step_batch_sizes)):
        # Split what is left of the budget between the phases still to run.
        remaining = deadline_all - time.perf_counter()
        deadline = time.perf_counter() + (remaining / 2 if not checkpointing else remaining)
        result = run_phase(trainer, device, checkpointing, _parse_sizes(sizes), 1, ns.rounds, deadline)
        phases.append(result)
        if "error" in result:
            print(f"[gpu_round] {'GC' if checkpointing else 'no GC'}: {result['error']}", flush=True)
            continue
        wall = result["wall"]
        print(
            f"[gpu_round] {'GC   ' if checkpointing else 'no GC'} step_batch_size={result['step_batch_size']}: round "
            f"{wall['round_s']:.2f}s floor {wall['floor_s']:.2f}s ratio {wall['ratio']:.3f} peak "
            f"{result['peak_memory_gb'] if result['peak_memory_gb'] is not None else float('nan'):.1f} GiB, "
            f"syncs/round {result['syncs'].get('total', '-')}",
            flush=True,
        )
    total_s = time.perf_counter() - start
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[gpu_round] done in {total_s:.0f}s", flush=True)

    rows = []
    for r in phases:
        if "error" in r:
            rows.append(
                ["yes" if r["gradient_checkpointing"] else "no", "-", "-", "-", "-", "-", "-", r["error"], "-"]
            )
            continue
        wall = r["wall"]
        rows.append(
            [
                "yes" if r["gradient_checkpointing"] else "no",
                r["step_batch_size"] if r["step_batch_size"] is not None else "None (all T)",
                f"{r['rows_rollout']} / {r['rows_teacher_student']}",
                f"{wall['round_s']:.2f}",
                f"{wall['floor_rollout_s']:.2f} / {wall['floor_teacher_s']:.2f} / {wall['floor_student_s']:.2f}",
                f"{wall['floor_s']:.2f}",
                f"**{wall['ratio']:.3f}** ({wall['ratio_min']:.3f}-{wall['ratio_max']:.3f})",
                "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}",
                r["syncs"].get("total", "n/a (CPU)"),
            ]
        )
    syncs = "\n".join(
        f"- {'GC' if r.get('gradient_checkpointing') else 'no GC'}: "
        + ", ".join(f"`{k}` x{v}" for k, v in r["syncs"]["top"])
        for r in phases
        if r.get("syncs", {}).get("top")
    )
    name = "gpu_round_tiny" if ns.tiny else "gpu_round"
    label = "tiny smoke check" if ns.tiny else "SD3.5-Medium size"
    markdown = (
        f"{params_b * 1e3:.1f}M-parameter SD3 transformer ({'tiny' if ns.tiny else 'SD3.5-Medium config'}, random weights, "
        f"{str(dtype).replace('torch.', '')}) on {device}, 3 tasks x {ns.prompts_per_task} prompts, {resolution} px, "
        f"N={steps}, student CFG 4.5, teacher CFG {TEACHER_GUIDANCE}, student LoRA r32/alpha64 + 3 teacher LoRAs "
        f"r{ns.rank}, T5 length {msl}. Wall clock (CUDA-synchronised), one warm-up round; floor = passes alone. "
        f"Saved activations per student row (meta-device estimate, `benchmarks/memory.py`): "
        f"{estimate[False]['without_attention_probs_gib']:.3g} GiB without checkpointing (plus "
        f"{estimate[False]['attention_probs_gib']:.3g} GiB of attention probabilities that flash attention does not "
        f"keep), {estimate[True]['total_gib']:.3g} GiB with. "
        f"Static memory after set-up: {'-' if static_gb is None else f'{static_gb:.1f} GiB'}; process peak RSS "
        f"{peak_rss_gb:.1f} GiB; whole script {total_s:.0f}s (build {build_s:.0f}s).\n\n"
        + markdown_table(
            [
                "grad. checkpointing",
                "step_batch_size",
                "rows: rollout / teacher & student call",
                "round (s)",
                "floor: rollout / teachers / student (s)",
                "floor (s)",
                "round / floor",
                "peak GPU memory (GiB)",
                "host syncs in a round (warm-up round, CUDA)",
            ],
            rows,
        )
        + (f"\n\nMost frequent synchronising lines:\n{syncs}\n" if syncs else "\n")
        + (
            "\nWith `--tiny` this is a smoke check of the code path: passes of a 0.1M-parameter model take "
            "milliseconds, so fixed Python costs dominate and the ratio says nothing about the GPU.\n"
            if ns.tiny
            else ""
        )
    )
    run_config = {
        "device": str(device),
        "dtype": str(dtype),
        "resolution": resolution,
        "N": steps,
        "prompts_per_task": ns.prompts_per_task,
        "max_sequence_length": msl,
        "teacher_rank": ns.rank,
        "timed_rounds": ns.rounds,
    }
    data = {
        "params_billion": params_b,
        "build_s": build_s,
        "total_s": total_s,
        "static_gb": static_gb,
        "saved_activations_per_row": {"no_gc": estimate[False], "gc": estimate[True]},
        "phases": phases,
    }
    if not ns.no_write:
        write_results(name, f"GPU round at {label}", run_config, data, markdown)
    return data


if __name__ == "__main__":
    main()
