"""Issue #7, items 1-2: the cost of one training round against its floor of transformer passes.

A round needs, per task: N student forward passes for the rollout (B rows, x2 with CFG), the teacher passes at the T
trained steps (T*B rows in one call, x2 with CFG) and one student forward+backward at the same T*B rows. This script
trains with `DiffusionOPDTrainer.train()`, clocks each optimizer step (a whole round: every task's rollout, teacher
and student passes, the backward, grad clipping and the optimizer update) from `on_step_begin` to `on_step_end`,
and right after each round, in the same process and at the same shapes, times every kind of pass alone with the
trainer's own `family.velocity` on the unwrapped transformer with the right adapter active. The report is
round time / sum of pass times (target <= 1.10), median over the timed rounds.

    python -m benchmarks.round_cost                 # SD3 and FLUX, 1 and 3 tasks, N = 10 and 20
    python -m benchmarks.round_cost --quick         # one small configuration (smoke check)
    python -m benchmarks.round_cost --profile       # also print a cProfile of one extra round per configuration
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from trl_diffusion_opd.families.base import cond_tile

from .common import (
    TASK_PROMPTS,
    markdown_table,
    median,
    save_teachers,
    setup,
    small_flux_pipeline,
    small_sd3_pipeline,
    write_results,
)


ALL_TASKS = list(TASK_PROMPTS)
CLOCKS = ("wall", "cpu")


def _now() -> tuple[float, float]:
    """(wall-clock, process CPU) seconds. With one torch thread the CPU clock measures the work done and is far less
    sensitive than the wall clock to other processes sharing the machine."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    end = _now()
    return end[0] - start[0], end[1] - start[1]


# ---------------------------------------------------------------------------------------------- floor passes
class PassTimer:
    """Times each kind of transformer pass of a round alone, at the trainer's shapes, with its own `family.velocity`.

    Teacher and student calls follow the trainer's chunking of the T trained steps (`step_batch_size`; `None` = one
    call of T*B rows): each distinct chunk size is timed once and counted as often as the trainer calls it.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        args = trainer.args
        self.family = trainer.family
        self.transformer = trainer.accelerator.unwrap_model(trainer.model)
        self.batch = args.per_device_train_batch_size
        self.num_steps = args.num_inference_steps
        trained = args.num_train_timesteps
        size = args.step_batch_size or trained
        sizes = [min(size, trained - start) for start in range(0, trained, size)]
        self.chunks = {n: sizes.count(n) for n in sorted(set(sizes))}  # steps per call -> number of calls
        self.device = args.device
        generator = torch.Generator().manual_seed(0)
        self.x = self.family.init_latents(self.batch, args.resolution, generator).to(self.device)
        self.sigma = torch.full((self.batch,), 0.6, device=self.device)

    def _rows(self, steps: int):
        x = self.x.repeat(steps, *([1] * (self.x.dim() - 1)))
        return x, self.sigma.repeat(steps)

    def _cond(self, task: str, times: int = 1):
        prompts = [row["prompt"] for row in self.trainer.task_prompts[task][: self.batch]]
        cond = self.trainer.prompt_cache(prompts)
        negative = cond_tile(self.trainer.prompt_cache([self.trainer.args.negative_prompt]), self.batch)
        return cond_tile(cond, times), cond_tile(negative, times)

    @torch.no_grad()
    def rollout(self, task: str) -> tuple[float, float]:
        """N student forward passes at B rows (x2 with CFG), no grad."""
        cond, negative = self._cond(task)
        guidance = self.trainer.args.guidance_scale
        start = _now()
        for _ in range(self.num_steps):
            self.family.velocity(self.transformer, self.x, self.sigma, cond, guidance, negative)
        return _since(start)

    @torch.no_grad()
    def teacher(self, task: str, spec) -> tuple[float, float]:
        """The teacher passes of one task: one call per chunk of steps (x2 rows with the teacher's CFG), no grad,
        teacher adapter active."""
        args = self.trainer.args
        guidance = spec.guidance_scale if spec.guidance_scale is not None else args.teacher_guidance_for(task)
        total = [0.0, 0.0]
        with self.trainer.adapters.use(spec.name):
            for steps, calls in self.chunks.items():
                cond, negative = self._cond(task, steps)
                x, sigma = self._rows(steps)
                start = _now()
                self.family.velocity(self.transformer, x, sigma, cond, guidance, negative)
                elapsed = _since(start)
                total = [t + calls * e for t, e in zip(total, elapsed)]
        return tuple(total)

    def student(self, task: str) -> tuple[float, float]:
        """The student forward + backward passes of one task: one per chunk of steps (x2 rows with CFG)."""
        guidance = self.trainer.args.guidance_scale
        total = [0.0, 0.0]
        for steps, calls in self.chunks.items():
            cond, negative = self._cond(task, steps)
            x, sigma = self._rows(steps)
            start = _now()
            v = self.family.velocity(self.transformer, x, sigma, cond, guidance, negative)
            v.float().square().mean().backward()
            elapsed = _since(start)
            del v
            for param in self.trainer.student_parameters:
                param.grad = None
            total = [t + calls * e for t, e in zip(total, elapsed)]
        return tuple(total)

    def floor(self, tasks: list[str]) -> dict[str, dict[str, float]]:
        """The round's floor, `{clock: {kind: seconds}}`: every task's rollout passes, teacher passes (its own
        adapter and CFG) and student forward+backward, each timed alone."""
        kinds = {"rollout": [0.0, 0.0], "teacher": [0.0, 0.0], "student": [0.0, 0.0]}
        for task in tasks:
            timings = [("rollout", self.rollout(task)), ("student", self.student(task))]
            timings += [("teacher", self.teacher(task, spec)) for spec in self._teachers(task)]
            for kind, elapsed in timings:
                kinds[kind] = [k + e for k, e in zip(kinds[kind], elapsed)]
        out = {}
        for c, clock in enumerate(CLOCKS):
            out[clock] = {kind: value[c] for kind, value in kinds.items()}
            out[clock]["total"] = sum(value[c] for value in kinds.values())
        return out

    def _teachers(self, task: str) -> list:
        return list(self.trainer.teacher_specs[task])


class _RoundClock(TrainerCallback):
    """Clocks every optimizer step (= one round) and measures the floor right after it, in the same process.

    It also audits the round: transformer calls and rows (forward hook on the transformer) and VAE calls, to be
    compared with what the algorithm needs. `deadline` (a `perf_counter` time) stops training early, once at least
    one round after the warm-up is timed, when another round and its floor would not fit.
    """

    def __init__(
        self, timer: PassTimer, tasks: list[str], profile_round, warmup: int = 1, deadline=None, audit_syncs=False
    ):
        self.timer, self.tasks, self.profile_round = timer, tasks, profile_round
        self.warmup, self.deadline = warmup, deadline
        # On CUDA, the first (warm-up, untimed) round runs with the sync debug mode on, to list what synchronises.
        self.audit_syncs = audit_syncs and torch.cuda.is_available()
        self.syncs: Counter = Counter()
        self._catch = None
        self.rounds: list[tuple[float, float]] = []
        self.floors: list[dict[str, dict[str, float]]] = []
        self.audits: list[dict[str, int]] = []
        self.profiler: cProfile.Profile | None = None
        self._active = False
        self._counts = {"transformer_calls": 0, "transformer_rows": 0, "vae_calls": 0}
        self._hooks = [timer.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)]
        vae = getattr(timer.trainer.pipeline, "vae", None)
        if isinstance(vae, torch.nn.Module):
            self._hooks.append(vae.register_forward_pre_hook(self._on_vae))

    def _on_transformer(self, module, args, kwargs):
        if self._active:
            x = kwargs.get("hidden_states", args[0] if args else None)
            self._counts["transformer_calls"] += 1
            self._counts["transformer_rows"] += int(x.shape[0])

    def _on_vae(self, module, args):
        if self._active:
            self._counts["vae_calls"] += 1

    def close(self):
        """Remove the hooks; undo the sync debug mode if a round failed while it was on."""
        for hook in self._hooks:
            hook.remove()
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_round is not None and len(self.rounds) == self.profile_round:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self._counts = dict.fromkeys(self._counts, 0)
        self._active = True
        if self.audit_syncs and not self.rounds:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.start = _now()

    def on_step_end(self, args, state, control, **kwargs):
        self.rounds.append(_since(self.start))
        self._active = False
        self.audits.append(dict(self._counts))
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None
            for warning in self._caught:
                if "synchroniz" in str(warning.message).lower():
                    self.syncs[f"{os.path.relpath(warning.filename)}:{warning.lineno}"] += 1
        if len(self.rounds) <= self.warmup:
            return  # warm-up rounds get no floor: the round itself warmed the same shapes
        if self.profiler is not None and len(self.rounds) == self.profile_round + 1:
            self.profiler.disable()
            return  # the profiled round is not timed
        floor_start = time.perf_counter()
        self.floors.append(self.timer.floor(self.tasks))
        floor_seconds = time.perf_counter() - floor_start
        if self.deadline is not None:
            if time.perf_counter() + self.rounds[-1][0] + floor_seconds > self.deadline:
                control.should_training_stop = True


def expected_passes(trainer, tasks: list[str]) -> dict[str, int]:
    """Transformer calls and rows one round needs: per task N rollout calls of B rows, one teacher call per chunk of
    trained steps and teacher, one student call per chunk (rows x2 where CFG batches the unconditional branch). With
    the fused on-policy pass (`fused_rollout`) the rollout's T calls at the trained steps are the student's pass and
    the N - T later steps are not run: T calls of B rows, no separate student call."""
    args = trainer.args
    batch, trained = args.per_device_train_batch_size, args.num_train_timesteps
    size = args.step_batch_size if isinstance(args.step_batch_size, int) else trained
    chunks = -(-trained // size)
    embedded = trainer.family.uses_guidance_embedding

    def cfg(scale: float) -> int:
        return 2 if scale > 1 and not embedded else 1

    calls = rows = 0
    for task in tasks:
        if args.fused_rollout:
            calls += trained
            rows += trained * batch * cfg(args.guidance_scale)
        else:
            calls += args.num_inference_steps + chunks
            rows += args.num_inference_steps * batch * cfg(args.guidance_scale) + trained * batch * cfg(
                args.guidance_scale
            )
        for spec in trainer.teacher_specs[task]:
            scale = spec.guidance_scale if spec.guidance_scale is not None else args.teacher_guidance_for(task)
            calls += chunks
            rows += trained * batch * cfg(scale)
    return {"transformer_calls": calls, "transformer_rows": rows, "vae_calls": 0}


def _build(family: str, tasks: list[str], num_steps: int, batch: int, folder: Path, size="small", **overrides):
    """A trainer on the small or tiny (smoke test) pipeline of `family`, one toy teacher per task."""
    from trl_diffusion_opd.testing import TINY_RESOLUTION, get_tiny_flux_pipeline, get_tiny_sd3_pipeline

    from .common import make_trainer

    tiny = size == "tiny"
    if family == "sd3":
        pipe = get_tiny_sd3_pipeline(with_t5=False) if tiny else small_sd3_pipeline()
        extra = {"resolution": TINY_RESOLUTION if tiny else 64, "max_sequence_length": 1}
    elif family == "flux":
        pipe = get_tiny_flux_pipeline() if tiny else small_flux_pipeline()
        extra = {"resolution": TINY_RESOLUTION if tiny else 64, "max_sequence_length": 8}
    else:
        raise ValueError(family)
    teachers = save_teachers(pipe, folder / family, tasks)
    config = dict(
        num_inference_steps=num_steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        guidance_scale=4.5,
        noise_level=0.0,
        **extra,
    )
    config.update(overrides)
    return make_trainer(pipe, teachers, str(folder / f"out-{family}"), **config)


def profile_breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Shares of a profiled round: inside `family.velocity` (transformer forward calls), inside autograd's backward,
    in the optimizer step and gradient clipping, and everything else (the trainer's own Python and tensor math)."""
    total = velocity = backward = optimizer = 0.0
    for (filename, _, name), (_, _, own, cumulative, _) in stats.stats.items():
        total += own
        path = filename.replace("\\", "/")
        if name == "velocity" and "/families/" in path:
            velocity += cumulative
        elif "run_backward' of" in name:  # the C engine call, not its Python wrapper
            backward += cumulative
        elif (name == "step" and "/torch/optim/" in path) or name == "clip_grad_norm_" and "accelerate" in path:
            optimizer += cumulative
    other = total - velocity - backward - optimizer
    return {
        "total_s": total,
        "velocity": velocity / total,
        "backward": backward / total,
        "optimizer": optimizer / total,
        "other": other / total,
    }


def measure_trainer(
    trainer, warmup: int, rounds: int, profile: bool = False, deadline=None, audit_syncs: bool = False
) -> dict:
    """Run `trainer.train()` for `warmup + rounds` rounds over all its tasks; median round time, floor and ratio of
    the timed rounds, on the wall and CPU clocks, and the pass audit (measured vs needed transformer calls/rows)."""
    tasks = list(trainer.teacher_specs)
    timer = PassTimer(trainer)
    # An extra round at the end is profiled (cProfile slows Python down, so it is not timed).
    clock = _RoundClock(timer, tasks, warmup + rounds if profile else None, warmup, deadline, audit_syncs)
    trainer.add_callback(clock)
    trainer.args.max_steps = warmup + rounds + (1 if profile else 0)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(clock)
        clock.close()
    args = trainer.args
    cfg = args.guidance_scale > 1 and not trainer.family.uses_guidance_embedding
    chunk = args.step_batch_size or args.num_train_timesteps
    result = {
        "tasks": len(tasks),
        "N": args.num_inference_steps,
        "T": args.num_train_timesteps,
        "B": args.per_device_train_batch_size,
        "cfg": cfg,
        "step_batch_size": args.step_batch_size,
        "rows_rollout": args.per_device_train_batch_size * (2 if cfg else 1),
        "rows_teacher_student": chunk * args.per_device_train_batch_size * (2 if cfg else 1),
    }
    if clock.profiler is not None:
        stream = io.StringIO()
        stats = pstats.Stats(clock.profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(35)
        result["profile"] = stream.getvalue()
        result["profile_breakdown"] = profile_breakdown(stats)
        clock.rounds = clock.rounds[: warmup + rounds]
    for c, name in enumerate(CLOCKS):
        rounds_t = [r[c] for r in clock.rounds[warmup:]]
        floors = [f[name] for f in clock.floors]  # one per timed round
        ratios = [r / f["total"] for r, f in zip(rounds_t, floors)]
        result[name] = {
            "round_s": median(rounds_t),
            "floor_s": median(f["total"] for f in floors),
            "floor_rollout_s": median(f["rollout"] for f in floors),
            "floor_teacher_s": median(f["teacher"] for f in floors),
            "floor_student_s": median(f["student"] for f in floors),
            "ratio": median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds_s": rounds_t,
            "floors_s": [f["total"] for f in floors],
        }
    result["warmup_round_s"] = clock.rounds[0][0] if clock.rounds else None
    if clock.audit_syncs:
        result["syncs"] = {"total": sum(clock.syncs.values()), "top": clock.syncs.most_common(10)}
    result["audit"] = clock.audits[-1] if clock.audits else {}
    result["audit_expected"] = expected_passes(trainer, tasks)
    return result


def measure(
    family: str,
    num_tasks: int,
    num_steps: int,
    batch: int,
    rounds: int,
    warmup: int = 1,
    profile: bool = False,
    size: str = "small",
    **overrides,
) -> dict:
    """Build a trainer on a small `family` pipeline with `num_tasks` toy teachers and measure its rounds."""
    tasks = ALL_TASKS[:num_tasks]
    with tempfile.TemporaryDirectory() as folder:
        trainer = _build(family, tasks, num_steps, batch, Path(folder), size, max_steps=warmup + rounds, **overrides)
        result = {"family": family, **measure_trainer(trainer, warmup, rounds, profile)}
        del trainer
    return result


# (family, tasks, N, timed rounds): the 3-task rounds are 3x longer, so fewer of them fit the `make bench` budget.
CONFIGS_FULL = [
    ("sd3", 1, 10, 3),
    ("sd3", 3, 10, 2),
    ("sd3", 1, 20, 3),
    ("sd3", 3, 20, 2),
    ("flux", 1, 10, 3),
    ("flux", 3, 10, 2),
    ("flux", 1, 20, 3),
    ("flux", 3, 20, 2),
]
CONFIGS_QUICK = [("sd3", 1, 4, 2), ("flux", 1, 4, 2)]
TARGET = 1.10


def _row(r: dict) -> list:
    if "error" in r:
        return [r["family"], r["tasks"], r["N"]] + ["-"] * (len(HEADERS) - 4) + [f"failed: {r['error']}"]
    wall, cpu = r["wall"], r["cpu"]

    def ratio(m):
        ok = "yes" if m["ratio"] <= TARGET else "no"
        return f"**{m['ratio']:.3f}** ({m['ratio_min']:.3f}-{m['ratio_max']:.3f}) {ok}"

    return [
        r["family"],
        r["tasks"],
        r["N"],
        r["T"],
        f"{r['rows_rollout']} / {r['rows_teacher_student']}",
        len(cpu["rounds_s"]),
        cpu["round_s"],
        cpu["floor_rollout_s"],
        cpu["floor_teacher_s"],
        cpu["floor_student_s"],
        cpu["floor_s"],
        ratio(cpu),
        f"{wall['round_s']:.3g} / {wall['floor_s']:.3g}",
        ratio(wall),
        _audit(r),
    ]


def _audit(r: dict) -> str:
    got, need = r.get("audit", {}), r.get("audit_expected", {})
    if not got:
        return "-"
    ok = all(got.get(k) == v for k, v in need.items())
    return (
        f"{got['transformer_calls']} / {got['transformer_rows']} (need {need['transformer_calls']} / "
        f"{need['transformer_rows']}), VAE {got['vae_calls']} {'ok' if ok else 'MISMATCH'}"
    )


HEADERS = [
    "family",
    "tasks",
    "N",
    "T",
    "rows: rollout call / teacher & student call",
    "timed rounds",
    "round CPU (s)",
    "floor: rollout (s)",
    "floor: teachers (s)",
    "floor: student fwd+bwd (s)",
    "floor total (s)",
    "round / floor, CPU clock (min-max), <= 1.10?",
    "wall: round / floor (s)",
    "round / floor, wall clock (min-max), <= 1.10?",
    "audit: transformer calls / rows per round (needed), VAE calls",
]

DESCRIPTION = """Round = one optimizer step of `trainer.train()` (every task's rollout, teacher and student passes, backward, grad
clipping, AdamW), median over the timed rounds after one warm-up round. Floor = the same passes timed alone right after
each round, in the same process, with `family.velocity` on the same transformer and the right adapter, for every task:
the student's rollout pass x N (B rows, x2 with CFG), the task teacher's pass at T*B rows (x2 with CFG) and the
student's forward+backward at T*B rows. Ratio = median over rounds of round / floor. CPU clock = process CPU time (one torch thread, so it counts
the work done and is robust to other processes on this shared machine); wall clock = `perf_counter`, shown for
completeness. SD3: 4 MMDiT blocks, hidden 256, 32x32 latents (256 image tokens + 78 text tokens), CFG 4.5 for student
and teachers (rows doubled). FLUX (FLUX.1-dev-like, guidance embedding, so no CFG rows): 2 double + 2 single blocks,
hidden 256, 32x32 latents (256 packed tokens + 8 text tokens). Student LoRA r32/alpha64 on the 8 attention projections
(SD3) or 12 projections (FLUX); teachers r8 toy LoRAs; B = 1 prompt per task; ODE sampler."""


def overheads_at_scale(repeats: int = 20) -> dict:
    """Per-call Python costs that grow with the model's module count, at SD3.5-Medium size: the transformer is built on
    the meta device (no memory, no compute) with the student and three teacher LoRAs (r32 on the eight attention
    projections), inside a `StableDiffusion3Pipeline` so that the trainer's own family and adapter switch are timed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig

    from trl_diffusion_opd.families.base import get_family
    from trl_diffusion_opd.teachers import AdapterSwitch

    from .gpu_round import SD35_MEDIUM

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
    components = dict.fromkeys(
        ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **components)
    family = get_family(pipe)
    for name in ("geneval", "ocr", "aes", "student"):
        config = LoraConfig(r=32, lora_alpha=64, target_modules=family.default_lora_targets)
        transformer.add_adapter(config, adapter_name=name)
    switch = AdapterSwitch(transformer, "student")

    def per_call_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * median(times)

    def use_teacher():
        with switch.use("ocr"):
            pass

    from .memory import saved_activations_per_row

    memory = {gc: saved_activations_per_row(SD35_MEDIUM, checkpointing=gc) for gc in (False, True)}
    modules = sum(1 for _ in transformer.modules())
    # Per round of the GPU recipe (3 tasks, N=10, T=9): velocity calls N + 2 * chunks per task, one teacher switch
    # per chunk per task; chunks = 1 (step_batch_size=None) or 9 (step_batch_size=1).
    items = {
        "family.dtype (once per family.velocity call)": (per_call_ms(lambda: family.dtype), (36, 84)),
        "adapters.use(teacher) enter + exit": (per_call_ms(use_teacher), (3, 27)),
    }
    return {
        "modules": modules,
        "items": {k: {"ms": v[0], "calls_per_round": v[1]} for k, v in items.items()},
        "saved_activations_per_row": {"no_gc": memory[False], "gc": memory[True]},
    }


def _overheads_markdown(data: dict) -> str:
    rows = []
    for name, item in data["items"].items():
        calls = item["calls_per_round"]
        rows.append(
            [
                name,
                f"{item['ms']:.2f}",
                f"{calls[0]} / {calls[1]}",
                f"{calls[0] * item['ms']:.0f} / {calls[1] * item['ms']:.0f}",
            ]
        )
    return (
        f"Per-call Python overheads at SD3.5-Medium size ({data['modules']} modules with the student and 3 teacher "
        "LoRAs; built on the meta device, timed on this CPU). Calls per round for the GPU recipe (3 tasks, N=10, "
        "T=9) with `step_batch_size=None` / `1`. On a GPU this host time only hides behind queued kernels when the "
        "loop does not synchronise.\n\n"
        + markdown_table(["overhead", "ms per call", "calls per round (None / 1)", "ms per round (None / 1)"], rows)
        + _memory_markdown(data["saved_activations_per_row"])
    )


def _memory_markdown(memory: dict) -> str:
    no_gc, gc = memory["no_gc"], memory["gc"]
    per_call = {size: size * 3 * 2 for size in (1, 3, 9)}  # steps x 3 prompts x 2 (CFG)
    sizes = ", ".join(
        f"{rows} rows (step_batch_size={size}{' = None' if size == 9 else ''}) ~{rows * no_gc['without_attention_probs_gib']:.0f} GiB"
        for size, rows in per_call.items()
    )
    return (
        "\n\nActivation memory of the student forward+backward at SD3.5-Medium size, 512 px, T5 length 128, bf16 "
        f"(saved tensors counted on the meta device, `benchmarks/memory.py`): {no_gc['without_attention_probs_gib']:.2f} "
        f"GiB per row without gradient checkpointing (plus {no_gc['attention_probs_gib']:.2f} GiB of attention "
        f"probabilities that only the math attention path keeps), {gc['total_gib']:.3f} GiB per row with it. Per student "
        f"call of the recipe (3 prompts, CFG) without checkpointing: {sizes}; with checkpointing all 54 rows keep "
        f"~{54 * gc['total_gib']:.1f} GiB (plus one block's recompute)."
    )


def run(quick: bool = False, batch: int = 1, profile: bool = False, write: bool = True, rounds=None, **kw) -> dict:
    setup()
    configs = CONFIGS_QUICK if quick else CONFIGS_FULL
    results = []
    for index, (family, num_tasks, num_steps, timed) in enumerate(configs):
        timed = rounds or timed
        try:
            # The first configuration always gets one extra, untimed, profiled round for the breakdown below.
            result = measure(family, num_tasks, num_steps, batch, timed, profile=profile or index == 0, **kw)
        except Exception as error:  # report, keep the other configurations
            result = {
                "family": family,
                "tasks": num_tasks,
                "N": num_steps,
                "error": f"{type(error).__name__}: {error}",
            }
        results.append(result)
        if "error" in result:
            print(f"[round_cost] {family} tasks={num_tasks} N={num_steps}: FAILED {result['error']}", flush=True)
            continue
        cpu, wall = result["cpu"], result["wall"]
        print(
            f"[round_cost] {family} tasks={num_tasks} N={num_steps}: CPU round {cpu['round_s']:.3f}s floor "
            f"{cpu['floor_s']:.3f}s ratio {cpu['ratio']:.3f} [{cpu['ratio_min']:.3f}, {cpu['ratio_max']:.3f}] | wall "
            f"round {wall['round_s']:.3f}s floor {wall['floor_s']:.3f}s ratio {wall['ratio']:.3f}",
            flush=True,
        )
        if profile and "profile" in result:
            print(result["profile"])
    overheads = overheads_at_scale()
    for name, item in overheads["items"].items():
        print(f"[round_cost] SD3.5-M scale: {name}: {item['ms']:.2f} ms per call", flush=True)
    breakdowns = [
        f"{r['family']} {r['tasks']} task(s) N={r['N']}: transformer forward calls (`family.velocity`) "
        f"{100 * b['velocity']:.1f}%, backward {100 * b['backward']:.1f}%, optimizer step + grad clipping "
        f"{100 * b['optimizer']:.1f}%, everything else {100 * b['other']:.1f}% of {b['total_s']:.2f}s"
        for r in results
        if (b := r.get("profile_breakdown"))
    ]
    markdown = (
        DESCRIPTION
        + "\n\n"
        + markdown_table(HEADERS, [_row(r) for r in results])
        + "\n\nWhere a round's time goes (cProfile of one extra, untimed round; profiling inflates the Python share): "
        + "; ".join(breakdowns)
        + ".\n\n"
        + _overheads_markdown(overheads)
    )
    config = {"batch_per_task": batch, "warmup_rounds": 1, "sampler": "ODE", "guidance": 4.5, **kw}
    data = {"results": [{k: v for k, v in r.items() if k != "profile"} for r in results], "overheads": overheads}
    if write:
        write_results("round_cost", "Round cost vs floor", config, data, markdown)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One small configuration per family.")
    parser.add_argument("--rounds", type=int, default=None, help="Timed rounds per configuration (after a warm-up).")
    parser.add_argument("--batch", type=int, default=1, help="Prompts per task per round.")
    parser.add_argument("--profile", action="store_true", help="Print a cProfile of the second round.")
    parser.add_argument("--no-write", action="store_true", help="Do not write results files.")
    ns = parser.parse_args(argv)
    run(quick=ns.quick, rounds=ns.rounds, batch=ns.batch, profile=ns.profile, write=not ns.no_write)


if __name__ == "__main__":
    main()
