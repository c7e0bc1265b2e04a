"""The small interface every flow-matching model family implements.

The trainers (`trl_diffusion_opd/trainer/`), evaluation and benchmarks only talk to a `FlowMatchingFamily`. A family knows how its pipeline encodes
prompts, which sigma schedule its scheduler uses, how to lay out initial latents, how to call its transformer
(timestep convention, CFG batching or guidance embedding) and how to decode latents to images. Nothing else in the
package branches on the model family.

The families: SD3 / 3.5, FLUX.1 (+ Kontext), FLUX.2 [klein], Qwen-Image (+ Edit), Z-Image, Wan 2.1 / 2.2 (+ I2V).
Adding one (SANA, HunyuanVideo, ...) is one new file in this package, e.g. `families/sana.py`:

1. Subclass `FlowMatchingFamily` and set the class attributes `pipeline_class` (the diffusers pipeline class it
   wraps; `get_family` picks the family of the pipeline's class or of its nearest base class), `name` (a short
   identifier), `tag` (added to the model card's tags) and `default_lora_targets` (module-name suffixes of the
   student LoRA when the user passes no `LoraConfig`).
2. Implement the five abstract methods: `encode_prompts`, `sigmas`, `init_latents`, `velocity` and `decode` (their
   docstrings below are the contract). `velocity` must accept rows at different sigmas in one call (the trainer
   batches several sampler steps together), return float32 and take `guidance_scale` either as classifier-free
   guidance (`cfg_velocity` does the batching) or, for guidance-distilled models, through the model's guidance
   embedding, in which case `uses_guidance_embedding` must be `True`.
3. Options of the family that users may set (Z-Image's CFG truncation) are keyword arguments of its `__init__`
   (validated there, with a clear error); `options()` lists them, and the config's `family_kwargs` sets them from
   Python, YAML or the command line without the core knowing their names.
4. Override `text_encoders` when the pipeline's encoders are not named `text_encoder[_2|_3]`, and
   `pipeline_guidance_kwargs` when the pipeline's `__call__` takes the guidance under other arguments than
   `guidance_scale` (Qwen-Image: `true_cfg_scale` and `negative_prompt`); the model card's quick start uses it.
5. Decorate the class with `@register_family`. Every module of this package is imported by `get_family`, so no other
   file needs editing.

The conditioning a family returns is a plain `dict[str, torch.Tensor]` whose tensors all have the prompt batch as
their first dimension, so the trainer can cache, slice, tile and concatenate it without knowing its keys; inputs that
are not per-prompt (FLUX's text and image position ids) are built inside `velocity`. Latents are opaque `(B, ...)`
float32 tensors to the trainer, and sigmas are floats in [0, 1] with 1 pure noise: a family converts them to its
transformer's timestep convention (SD3: 1000·sigma; FLUX: sigma) inside `velocity`.

Video and multi-expert families (`families/wan.py`) use three optional hooks whose defaults keep image families
unchanged: `num_frames` (a constructor argument: frames per video, read by `init_latents` and `decode`), `experts`
(the transformers the denoiser runs, by pipeline component name; each carries the student and teacher LoRAs) with
`denoiser` (the module the trainer trains and passes to `velocity`: the transformer itself, or a container that
routes each row to the expert the pipeline would use at its sigma) and `expert_index` (which expert each sigma uses),
and `velocity(..., guidance_scale_2=...)`, the CFG scale of the second (low-noise) expert, which the trainer passes
only when the user sets one. `decode` of a video family returns one list of PIL frames per sample.

Editing families take input images per row (`max_input_images` > 0): their `encode_prompts(prompts, images)` gets one
list of PIL images (or `None`, a text-only row) per prompt and returns the row's whole conditioning, reference
latents and their position ids included, batch-first like the rest, so that the trainer caches it with the prompt
(keyed by the images' pixels) and never sees what it holds. Rows whose conditionings differ in shape (references of
other sizes, or none) are never batched together. The reference tokens are inputs of `velocity` only: the latents
the sampler steps are the generated image's, as in the pipelines. Text-to-image families keep `max_input_images = 0`
and the trainer refuses rows with images for them; editing-only families set `min_input_images = 1`. A family whose
negative (CFG) branch sees the images too (Qwen-Image-Edit) overrides `encode_negative`: each row then carries its
own negative in its conditioning.

To test a new family, add a tiny randomly initialised pipeline to `trl_diffusion_opd.testing` (and to its
`TINY_PIPELINES`, which makes it the base `tiny:<name>` of the CLI) and give it a row in `tests/helpers.py`: the
family contract suite (`tests/test_family_contract.py`) then checks that the trainer's rollout reproduces the
pipeline's own sampler, that a saved student reloads with the pipeline's `load_lora_weights`, and that distillation
lowers the KL to each teacher.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from ..sizes import Resolution, image_size


Cond = dict[str, torch.Tensor]

_FAMILIES: list[type[FlowMatchingFamily]] = []


def register_family(cls: type[FlowMatchingFamily]) -> type[FlowMatchingFamily]:
    """Class decorator that makes a family discoverable by `get_family`."""
    _FAMILIES.append(cls)
    return cls


def _import_family_modules() -> None:
    """Import every module of this package, so that each family file registers itself."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")


def get_family(pipeline: DiffusionPipeline, family_kwargs: dict | None = None, **kwargs) -> FlowMatchingFamily:
    """Return the family wrapper for `pipeline`, chosen by the pipeline's class (the most specific registered one).

    Args:
        pipeline: The diffusers pipeline.
        family_kwargs: The family's own options (the config's `family_kwargs`, e.g. Z-Image's `cfg_truncation`),
            checked against `FlowMatchingFamily.options()` of the family chosen.
        **kwargs: The options every family takes (`max_sequence_length`, `num_frames`).

    Raises:
        ValueError: no registered family handles this pipeline class, or `family_kwargs` names an option the family
            does not have.
    """
    _import_family_modules()
    for klass in type(pipeline).__mro__:
        for cls in _FAMILIES:
            if cls.pipeline_class is klass:
                family_kwargs = dict(family_kwargs or {})
                unknown = sorted(set(family_kwargs) - set(cls.options()))
                if unknown:
                    accepted = ", ".join(cls.options()) or "none"
                    raise ValueError(
                        f"`family_kwargs` has no option {', '.join(map(repr, unknown))} for the {cls.name} family "
                        f"({cls.pipeline_class.__name__}); its options: {accepted}."
                    )
                return cls(pipeline, **kwargs, **family_kwargs)
    supported = ", ".join(cls.pipeline_class.__name__ for cls in _FAMILIES)
    raise ValueError(f"{type(pipeline).__name__} is not supported; supported pipelines: {supported}.")


def family_class(pipeline_class: type) -> type[FlowMatchingFamily] | None:
    """The family `get_family` would choose for a pipeline of class `pipeline_class` (`None`: no family), without
    building the pipeline."""
    _import_family_modules()
    for klass in pipeline_class.__mro__:
        for cls in _FAMILIES:
            if cls.pipeline_class is klass:
                return cls
    return None


# `config(component)`: a pipeline's `model_index.json` (`component=None`) or a component's `config.json`, read without
# loading any weight (`FlowMatchingFamily.check_before_loading`).
ConfigReader = Callable[[str | None], dict]


def cond_select(cond: Cond, index: torch.Tensor | slice | list[int]) -> Cond:
    """Rows `index` of every tensor in `cond`."""
    return {k: v[index] for k, v in cond.items()}


def cond_tile(cond: Cond, times: int) -> Cond:
    """`cond` repeated `times` times along the batch (block-wise: [c0, c1, c0, c1, ...])."""
    if times == 1:
        return cond
    return {k: v.repeat(times, *([1] * (v.ndim - 1))) for k, v in cond.items()}


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditionings with the same keys along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


# Keys of a row's own negative conditioning inside its `Cond` (`FlowMatchingFamily.encode_negative`).
NEGATIVE_PREFIX = "negative."


def split_negative(cond: Cond) -> tuple[Cond, Cond | None]:
    """`cond` without its rows' own negative conditioning, and that negative (`None` when it carries none)."""
    if not any(key.startswith(NEGATIVE_PREFIX) for key in cond):
        return cond, None
    own = {k: v for k, v in cond.items() if not k.startswith(NEGATIVE_PREFIX)}
    negative = {k[len(NEGATIVE_PREFIX) :]: v for k, v in cond.items() if k.startswith(NEGATIVE_PREFIX)}
    return own, negative


class FlowMatchingFamily(abc.ABC):
    """A rectified-flow text-to-image (or text-to-video) model family, wrapping one diffusers pipeline.

    Latents `x` follow the family's own layout, ending in the latent grid (e.g. `(B, C, h, w)`; FLUX packs them into
    tokens in `velocity`), opaque `(B, ...)` tensors to the trainer. Sigmas are floats in [0, 1], 1 pure noise.

    Args:
        pipeline: The diffusers pipeline (its transformer may carry PEFT adapters).
        max_sequence_length: Length of the T5 prompt embeddings, when the family has a T5 encoder.
        num_frames: Frames per sample of a video family (`None`: the family's default); image families ignore it.
    """

    pipeline_class: ClassVar[type[DiffusionPipeline]]
    name: ClassVar[str]
    tag: ClassVar[str]
    default_lora_targets: ClassVar[list[str]]
    # The Hub pipeline tag of the model card.
    pipeline_tag: ClassVar[str] = "text-to-image"
    # What a task is called on the model card when its rows carry no input image / carry one.
    text_task_kind: ClassVar[str] = "text-to-image"
    image_task_kind: ClassVar[str] = "editing"
    # When `True`, `guidance_scale` is fed to a guidance embedding instead of doubling the batch for CFG.
    uses_guidance_embedding: bool = False
    # Input images a row may carry (`encode_prompts(prompts, images)`); 0: text-to-image only.
    max_input_images: ClassVar[int] = 0
    # Input images a row must carry (1: an editing-only pipeline, which cannot sample from text alone).
    min_input_images: ClassVar[int] = 0

    def __init__(
        self, pipeline: DiffusionPipeline, max_sequence_length: int | None = None, num_frames: int | None = None
    ):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.num_frames = num_frames
        self._dtype: torch.dtype | None = None

    @classmethod
    def options(cls) -> list[str]:
        """The family's own constructor options, which the config's `family_kwargs` sets (e.g. Z-Image's
        `cfg_truncation` and `cfg_normalization`): the keyword arguments of `__init__` beyond those of the base
        class. A family validates their values in `__init__`."""
        shared = {"self", "pipeline", "max_sequence_length", "num_frames"}
        parameters = inspect.signature(cls.__init__).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in parameters if p.name not in shared and p.kind in kinds]

    @classmethod
    def check_before_loading(
        cls,
        config: ConfigReader,
        resolution: Resolution,
        num_frames: int | None,
        rows: Iterable[tuple[str, dict[str, Any]]],
    ) -> None:
        """Raise a one-line `ValueError` for what the family can refuse from the pipeline's configs alone (`config`),
        before any weight loads: a size or frame count the model cannot run, a row (`(where, row)` pairs naming the
        rows) whose input images it cannot take. The default checks nothing: the trainer's checks run once the
        pipeline is built."""

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        """The transformers that carry the student and teacher LoRAs, by pipeline component name, the one
        `load_lora_weights` loads into by default first. With several, a key of `denoiser`'s state dict is
        `f"{component}.{key}"`; with one, `denoiser` is that transformer and keys are unprefixed."""
        return {"transformer": self.pipeline.transformer}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module the trainer trains and passes to `velocity` (default: the transformer)."""
        return self.pipeline.transformer

    def expert_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index into `experts` of the expert the pipeline runs at each sigma: `(B,)` float -> `(B,)` long."""
        return torch.zeros(sigma.shape, dtype=torch.long, device=sigma.device)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype, read once: diffusers walks every submodule for it (6.5 ms per call at
        SD3.5-Medium size with LoRAs, i.e. ~0.2 s of host time per round)."""
        if self._dtype is None:
            self._dtype = self.transformer.dtype
        return self._dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def resolution_multiple(self) -> int:
        """Image sides, in pixels, must be multiples of this: the VAE's downsampling factor times the transformer's
        patch size (one latent patch is one token). A family that packs its latents further overrides it."""
        patch_size = getattr(getattr(self.transformer, "config", None), "patch_size", None) or 1
        if isinstance(patch_size, (tuple, list)):  # video transformers patch (frames, height, width)
            patch_size = patch_size[-1]
        return self.vae_scale_factor * int(patch_size)

    def check_resolution(self, resolution: Resolution, name: str = "resolution") -> None:
        """Raise a one-line `ValueError` naming `name` when a side of `resolution` (a side or `(height, width)`) does
        not fit the latent layout (the latents would silently cover a smaller image than asked for)."""
        multiple, sides = self.resolution_multiple, image_size(resolution)
        if any(side % multiple for side in sides):
            nearest = [max(multiple, round(side / multiple) * multiple) for side in sides]
            got, fix = ("x".join(map(str, s)) if sides[0] != sides[1] else str(s[0]) for s in (sides, nearest))
            raise ValueError(
                f"`{name}` must be a multiple of {multiple} for this {self.name} pipeline (VAE scale factor "
                f"{self.vae_scale_factor} x latent patch {multiple // self.vae_scale_factor}), got {got}; e.g. {fix}."
            )

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders, so that callers can move them off the accelerator once prompts are cached."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    def new_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh copy of the pipeline's scheduler, so that setting timesteps never mutates the pipeline."""
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)

    def check_input_images(self, count: int, where: str) -> None:
        """Raise a one-line `ValueError` naming `where` (a data row) when it has more input images than the family
        takes."""
        if count < self.min_input_images:
            pipeline = type(self.pipeline).__name__
            raise ValueError(
                f"{where} has {count or 'no'} input image{'' if count == 1 else 's'}, but the {self.name} family "
                f"({pipeline}) needs at least {self.min_input_images} per row."
            )
        if count > self.max_input_images:
            pipeline = type(self.pipeline).__name__
            takes = f"takes at most {self.max_input_images}" if self.max_input_images else "takes no input images"
            raise ValueError(
                f"{where} has {count} input image{'s' if count > 1 else ''}, but the {self.name} family ({pipeline}) "
                f"{takes}."
            )

    @abc.abstractmethod
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Embed prompts with the pipeline's text encoders (no CFG duplication). Editing families take a second
        argument, `images`: per prompt a list of PIL images or `None` (see the module docstring).

        Returns:
            A `Cond` whose tensors have `len(prompts)` rows, in the transformer's dtype.
        """

    def batch_key(self, cond: Cond) -> tuple:
        """What a one-row conditioning must share with the others of its batch (the trainer batches only rows of
        equal keys): by default its tensors' shapes; families whose position ids depend on the references' layout
        add them (two references of other sizes can make as many tokens)."""
        return tuple(sorted((key, tuple(value.shape[1:])) for key, value in cond.items()))

    def output_resolution(self, cond: Cond) -> Resolution | None:
        """The output size `(height, width)` that conditioning `cond` (rows of one `batch_key`) asks for, as the
        pipeline's default size from its input images (editing families with `size_from_image`); `None`, the
        default, for the config's `resolution`."""
        return None

    def encode_negative(self, negative_prompt: str, images: list) -> Cond | None:
        """The negative (CFG) conditioning of rows with input images `images` (per row a list of PIL images), when
        the family's negative branch depends on them, as Qwen-Image-Edit's (the negative prompt is encoded with the
        images); `None`, the default, when it does not and one text-only negative serves every row.

        The trainer stores it in the row's conditioning under `NEGATIVE_PREFIX` keys, so it is cached, tiled and
        sliced with the row; such a family's `velocity` uses it (`split_negative`) in place of `negative_cond`."""
        return None

    @abc.abstractmethod
    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        """The sampler's sigma schedule (FLUX, Qwen-Image, Z-Image shift it by the image's token count).

        Returns:
            float32 tensor of shape `(num_steps + 1,)`, decreasing from about 1 to exactly 0.
        """

    @abc.abstractmethod
    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        """Standard-normal float32 initial latents x_{t_0} for images of `resolution` (a side, or `(height, width)`:
        `trl_diffusion_opd.sizes`); their last two dimensions are the latent grid's, which is all `velocity` sees."""

    @abc.abstractmethod
    def velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        guidance_scale: float = 1.0,
        negative_cond: Cond | None = None,
        guidance_scale_2: float | None = None,
    ) -> torch.Tensor:
        """Predicted velocity v(x, sigma) with guidance applied.

        Args:
            transformer: The transformer to call (the pipeline's, possibly wrapped for DDP, or a full teacher).
            x: Latents `(B, ...)`.
            sigma: Sigmas `(B,)` in [0, 1], one per row (rows may be at different steps).
            cond: Prompt conditioning with `B` rows.
            guidance_scale: CFG scale, or the guidance-embedding value for guidance-distilled models.
            negative_cond: Unconditional conditioning with `B` rows, used for CFG when `guidance_scale > 1`.
            guidance_scale_2: Multi-expert families only: the CFG scale of the rows the second (low-noise) expert
                runs; `None` uses `guidance_scale`. Image families need not accept it (the trainer passes it only
                when set, and refuses it for single-expert pipelines).

        Returns:
            Velocity of `x`'s shape, float32.
        """

    @abc.abstractmethod
    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        """Decode final latents x_{t_N} to PIL images of `resolution` (video families: a list of frames per sample)."""

    def full_latents(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The latents `decode` takes, from the final latents `x` the sampler moved and the rows' conditioning `cond`:
        `x` itself, unless the family keeps conditioned latents out of the sampler (Wan TI2V's first frame)."""
        return x

    def pipeline_guidance_kwargs(self, guidance_scale: float, negative_prompt: str) -> dict[str, object]:
        """The keyword arguments that make the pipeline's `__call__` sample with the guidance `velocity` applies for
        `guidance_scale` and `negative_prompt` (written into the model card's quick start).

        The default, `{"guidance_scale": g}`, is SD3's CFG and FLUX.1-dev's guidance embedding.
        """
        return {"guidance_scale": guidance_scale}

    def pipeline_image_kwargs(self, images: list, resolution: Resolution) -> dict[str, object]:
        """The keyword arguments that pass one row's input images (a list of PIL images) to the pipeline's
        `__call__` so that it samples at `resolution` what `velocity` samples (the `eval` command and the model
        card's quick start); with no images, what a text-only row needs (FLUX.1 Kontext: `max_area`). The default,
        `{"image": images}` (`{}` without images), is the multi-reference pipelines' (FLUX.2, Qwen-Image-Edit-Plus)."""
        return {"image": list(images)} if images else {}

    @staticmethod
    def cfg_velocity(
        call, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, negative_cond: Cond | None, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance by batching the unconditional and conditional rows in one call.

        `call(x, sigma, cond)` runs the transformer; the result is v_u + g (v_c − v_u), float32.
        """
        if guidance_scale <= 1.0 or negative_cond is None:
            return call(x, sigma, cond).float()
        v = call(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([negative_cond, cond])).float()
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
