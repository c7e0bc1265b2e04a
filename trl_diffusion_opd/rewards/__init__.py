"""Reward models for evaluation and sample logging: `reward(images, prompts, metadata) -> list[float]`.

```python
from trl_diffusion_opd.rewards import get_reward

ocr = get_reward("ocr")  # PP-OCR through rapidocr-onnxruntime (extra "ocr")
pick = get_reward("pickscore", device="cuda")  # loaded once; later calls with the same arguments reuse it
scores = pick(images, prompts, metadata)  # one float per image
```

| name | what | needs |
|---|---|---|
| `ocr` | quoted text of the prompt vs. OCR, 1 − normalised edit distance (Flow-GRPO) | extra `ocr` |
| `clipscore` | CLIP ViT-L/14 cosine(image, prompt) | transformers |
| `pickscore` | PickScore, raw logit_scale · cosine | transformers |
| `aesthetic` | LAION improved aesthetic predictor on CLIP ViT-L/14 | transformers |
| `temporal_consistency` | videos: mean cosine of adjacent frames' CLIP ViT-L/14 image embeddings | transformers |
| `geneval`, `unifiedreward`, `hpsv2`, `imagereward` | clients of a reward server (JSON; pickle opt-in) | a running server |
| `brightness`, `saturation`, `jpeg_compressibility` | rule-based, in [0, 1] | nothing |

Videos (lists of PIL frames, `(F, H, W, C)` arrays, `(F, C, H, W)` tensors) work with every reward: image rewards
score each frame and average over the frames (`rewards.base`), video rewards (`accepts_video`) take whole videos.

Plug-ins add rewards with `register_reward` (the tiny world's `world_composition`, `world_letters`,
`world_aesthetic`: `trl_diffusion_opd.world`); `get_reward` loads the plug-ins when a name is not found.
"""

from . import clip, ocr, remote, rules  # noqa: F401  (each module registers its rewards)
from .base import (
    FunctionReward,
    Reward,
    as_reward,
    clear_reward_cache,
    get_reward,
    load_reward_spec,
    nanmean,
    parse_reward_spec,
    register_reward,
    reward_help,
    reward_names,
    video_frames,
)
from .clip import TemporalConsistencyReward
from .ocr import OCRReward, levenshtein, ocr_target, text_similarity
from .remote import RemoteReward, RewardServerError


__all__ = [
    "FunctionReward",
    "OCRReward",
    "RemoteReward",
    "Reward",
    "RewardServerError",
    "TemporalConsistencyReward",
    "as_reward",
    "clear_reward_cache",
    "get_reward",
    "levenshtein",
    "load_reward_spec",
    "nanmean",
    "ocr_target",
    "parse_reward_spec",
    "register_reward",
    "reward_help",
    "reward_names",
    "text_similarity",
    "video_frames",
]
