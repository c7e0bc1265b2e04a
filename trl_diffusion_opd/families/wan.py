"""Wan 2.1 / 2.2 text-to-video (`WanPipeline`), including Wan 2.2 A14B's two experts.

What is done exactly as `WanPipeline.__call__` (diffusers 0.42.1, `pipelines/wan/pipeline_wan.py`) does it:

- Latents `(B, C, F, H/s, W/s)` with `F = (num_frames - 1) // 4 + 1` latent frames (`prepare_latents`), float32.
- Prompts: UMT5 `last_hidden_state` of the prompt cleaned as the pipeline cleans it, cut at its true length and
  zero-padded to `max_sequence_length` (the `__call__` default is 512), so every `Cond` row has the same shape; the
  negative prompt goes through the same path (the trainer encodes `negative_prompt`, "" by default, as the pipeline).
- Timestep: the raw scheduler timestep `t = 1000·sigma`, not rescaled by the transformer; TI2V-5B
  (`expand_timesteps`) receives it per latent token, `(B, F·H/2·W/2)`. The output is the velocity as is.
- CFG: on iff `guidance_scale > 1` (the first scale decides for both stages), `v = v_u + w (v_c - v_u)`.
- Wan 2.2 A14B: rows with `t >= boundary_ratio · 1000` run `transformer` (high noise) with `guidance_scale`, the
  others `transformer_2` (low noise) with `guidance_scale_2` (`None`: `guidance_scale`, as the pipeline).
- Wan 2.2 TI2V-5B: text-to-video only (`WanPipeline`): per-token timesteps, 48 latent channels and the Wan 2.2
  VAE (16x spatial compression, so `resolution` is a multiple of 32), pinned by `tests/test_wan.py` on the tiny
  `tiny:wan22_ti2v`. Its image-to-video mode (`WanImageToVideoPipeline`, a first frame kept clean through the
  timestep mask) is the `wan-i2v` family (`families/wan_i2v.py`).

What differs, on purpose: the Hub pipelines sample with `UniPCMultistepScheduler` (a multistep predictor-corrector,
not a single Gaussian transition, so it has no per-step KL). Like the diffusion-RL frameworks (Flow-GRPO, DanceGRPO,
Flow-Factory), the family samples with the flow-matching Euler step of `FlowMatchEulerDiscreteScheduler` with the
model's shift (UniPC's `flow_shift`), which `WanPipeline` accepts as its scheduler: `pipe.scheduler =
FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)` reproduces the trainer's ODE rollout.

KL: the per-step closed form runs over all latent elements, frames included. Use `kl_normalization="reference"`
(the default, a mean over elements) for published DiffusionOPD / Flow-GRPO hyper-parameters to transfer: `"paper"`
sums over `C·F·h·w` elements (2.1 M for 81 frames at 480×832), 3 to 4 orders of magnitude more than an image's.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, cond_cat, register_family


# `WanPipeline.__call__`'s default number of frames (81 at 16 fps for Wan 2.1 and 2.2 A14B).
DEFAULT_NUM_FRAMES = 81


class WanExperts(torch.nn.Module):
    """Wan 2.2's two experts as one trainable module that routes each row as `WanPipeline` does.

    Rows whose timestep is `>= boundary_timestep` run `transformer` (high noise), the others `transformer_2`; a batch
    with both kinds makes one call per expert. The student and the teachers are adapters on both experts, so
    `add_adapter` and `peft_config` cover both (state-dict keys are prefixed `transformer.` / `transformer_2.`).
    Under DDP, a step whose rows all fall on one side leaves the other expert's LoRA without gradient: the Trainer's
    default for this module (not a `PreTrainedModel`) is `find_unused_parameters=True`, and the trainers refuse
    `ddp_find_unused_parameters=False`.
    """

    # What accelerate's FSDP `TRANSFORMER_BASED_WRAP` wraps (it reads the attribute of the module it is given).
    _no_split_modules = ["WanTransformerBlock"]

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = boundary_timestep

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def peft_config(self) -> dict:
        return {**getattr(self.transformer_2, "peft_config", {}), **getattr(self.transformer, "peft_config", {})}

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.enable_gradient_checkpointing()

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False, **kwargs):
        # the row's noise level: TI2V's per-token timesteps are 0 on a conditioned first frame, t on the others
        t = timestep if timestep.ndim == 1 else timestep.amax(1)
        high = t >= self.boundary_timestep
        if high.all() or not high.any():
            expert = self.transformer if high.all() else self.transformer_2
            return expert(
                hidden_states=hidden_states,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                return_dict=False,
                **kwargs,
            )
        out = None
        for expert, rows in ((self.transformer, high.nonzero().squeeze(1)), (self.transformer_2, (~high).nonzero())):
            rows = rows.flatten()
            part = expert(
                hidden_states=hidden_states[rows],
                timestep=timestep[rows],
                encoder_hidden_states=encoder_hidden_states[rows],
                return_dict=False,
                **{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
            )[0]
            out = part.new_zeros((hidden_states.shape[0], *part.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, part)
        return (out,)


@register_family
class WanFamily(FlowMatchingFamily):
    """Wan 2.1 (`transformer`) and 2.2 (A14B: `transformer` + `transformer_2`; TI2V-5B: one transformer with
    per-token timesteps). See the module docstring for the pipeline details and the Euler-vs-UniPC choice.

    Video side: `num_frames` frames (default 81) of `resolution` pixels (a side, or height x width such as Wan's
    native 480 x 832), latents `(B, C, F, H/s, W/s)`.
    """

    pipeline_class = WanPipeline
    name = "wan"
    tag = "wan"
    pipeline_tag = "text-to-video"
    text_task_kind = "text-to-video"
    # Self-attention, cross-attention and MLP projections of every block (Flow-Factory's and the Wan LoRA trainers').
    default_lora_targets = [
        "attn1.to_k",
        "attn1.to_out.0",
        "attn1.to_q",
        "attn1.to_v",
        "attn2.to_k",
        "attn2.to_out.0",
        "attn2.to_q",
        "attn2.to_v",
        "ffn.net.0.proj",
        "ffn.net.2",
    ]

    def __init__(self, pipeline: WanPipeline, max_sequence_length: int | None = None, num_frames: int | None = None):
        super().__init__(pipeline, max_sequence_length, num_frames or DEFAULT_NUM_FRAMES)
        if pipeline.transformer is None:
            raise ValueError("WanPipeline without `transformer` (boundary_ratio 1.0) is not supported.")
        frames = self.num_frames - 1
        if frames % pipeline.vae_scale_factor_temporal:
            raise ValueError(
                f"num_frames must be 1 + a multiple of {pipeline.vae_scale_factor_temporal}, got {self.num_frames}."
            )
        self._scheduler = self._euler_scheduler()
        self._train_timesteps = float(self._scheduler.config.num_train_timesteps)
        ratio = pipeline.config.get("boundary_ratio")
        self._two_experts = ratio is not None and getattr(pipeline, "transformer_2", None) is not None
        self.boundary_timestep = ratio * self._train_timesteps if self._two_experts else None
        self._denoiser = (
            WanExperts(pipeline.transformer, pipeline.transformer_2, self.boundary_timestep)
            if self._two_experts
            else pipeline.transformer
        )

    def _euler_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        scheduler = self.pipeline.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        config = scheduler.config
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise ValueError(
                f"{type(scheduler).__name__} is not a flow-matching scheduler (`use_flow_sigmas`, `flow_prediction`)."
            )
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps, shift=config.get("flow_shift") or 1.0
        )

    def new_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """The flow-matching Euler scheduler with the pipeline's shift (UniPC's `flow_shift`), a fresh copy."""
        return FlowMatchEulerDiscreteScheduler.from_config(self._scheduler.config)

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        if self._two_experts:
            return {"transformer": self.pipeline.transformer, "transformer_2": self.pipeline.transformer_2}
        return {"transformer": self.pipeline.transformer}

    @property
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    def expert_index(self, sigma: torch.Tensor) -> torch.Tensor:
        if not self._two_experts:
            return super().expert_index(sigma)
        return (sigma.float() * self._train_timesteps < self.boundary_timestep).long()

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length or 512,
            device=self.device,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype)}

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        height, width = (side // self.vae_scale_factor for side in image_size(resolution))
        shape = (batch_size, self.transformer.config.in_channels, self.latent_frames(), height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def transformer_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple:
        """`(hidden_states, timestep, extra keyword arguments)` of the transformer call for latents `x` at the raw
        timesteps `t` `(B,)` (the image-to-video family adds its first-frame condition here)."""
        timestep = t
        if self.pipeline.config.get("expand_timesteps", False):  # TI2V-5B: one timestep per latent token
            patch = self.transformer.config.patch_size
            tokens = x.shape[2] // patch[0] * (x.shape[3] // patch[1]) * (x.shape[4] // patch[2])
            timestep = t[:, None].expand(-1, tokens)
        return x, timestep, {}

    def moved(self, v: torch.Tensor) -> torch.Tensor:
        """The part of the transformer's output the sampler steps (all of it here)."""
        return v

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None, guidance_scale_2=None):
        dtype = self.dtype
        # float32 t = 1000·sigma, exactly the FlowMatchEulerDiscreteScheduler timestep the pipeline passes
        t = sigma.float() * self._train_timesteps

        def call(x, t, cond):
            hidden_states, timestep, extra = self.transformer_inputs(x, t, cond)
            v = transformer(
                hidden_states=hidden_states.to(dtype),
                timestep=timestep,
                encoder_hidden_states=cond["prompt_embeds"],
                return_dict=False,
                **extra,
            )[0]
            return self.moved(v)

        if guidance_scale <= 1.0 or negative_cond is None:
            return call(x, t, cond).float()
        # the unconditional branch keeps the row's image conditioning (image-to-video), only the text changes
        v = call(torch.cat([x, x]), torch.cat([t, t]), cond_cat([{**cond, **negative_cond}, cond])).float()
        v_uncond, v_cond = v.chunk(2)
        scale = torch.full_like(t, guidance_scale)
        if self._two_experts and guidance_scale_2 is not None:
            scale = torch.where(t >= self.boundary_timestep, scale, torch.full_like(t, guidance_scale_2))
        scale = scale.view(-1, *([1] * (v.ndim - 1)))
        return v_uncond + scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        """Latents `(B, C, F, h, w)` to one list of `num_frames` PIL frames per sample, as `WanPipeline` decodes."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(x.device, vae.dtype)
        video = vae.decode(x.to(vae.dtype) * std + mean, return_dict=False)[0]
        return self.pipeline.video_processor.postprocess_video(video, output_type="pil")
