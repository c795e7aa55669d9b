"""How distinct the prompts the student learns its effects under are, as the base encodes them.

Two effects whose prompts encode alike are hard for one LoRA to tell apart: the student's only cue
for which effect to apply is its conditioning. :func:`prompt_separation` scores every pair of a
collection's prompts by the cosine similarity of their encodings (the mean over each prompt's
tokens), the closest pairs first.
"""

from __future__ import annotations

from typing import Any

import torch

from clora.backbone import Backbone


@torch.no_grad()
def prompt_encodings(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """One vector per prompt ``[N, D]``: its encoding averaged over its tokens (float32, CPU). A base
    whose prompt encoder also sees the image is shown a mid-grey one, the same for every prompt."""
    images = None
    if backbone.prompt_sees_image:
        h, w = backbone.image_size_for(256, 256, 256)  # small: the image only sets the context
        images = torch.full((len(prompts), 3, h, w), 0.5, device=backbone.device, dtype=backbone.dtype)
    enc = backbone.encode_prompts(prompts, images)
    mask = enc.mask.to(enc.embeds.device, torch.float32).unsqueeze(-1)
    pooled = (enc.embeds.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return pooled.cpu()


def prompt_separation(backbone: Backbone, prompts: dict[str, str], top: int = 5) -> dict[str, Any]:
    """Cosine similarity of the encodings of every pair of ``prompts`` (effect name -> prompt): the
    ``top`` closest pairs, and the mean and largest over all pairs (1: encoded alike)."""
    names = sorted(prompts)
    if len(names) < 2:
        return {"pairs": 0, "mean_cosine": None, "max_cosine": None, "closest": []}
    v = torch.nn.functional.normalize(prompt_encodings(backbone, [prompts[n] for n in names]), dim=1)
    cos = v @ v.T
    i, j = torch.triu_indices(len(names), len(names), offset=1)
    values = cos[i, j]
    order = torch.argsort(values, descending=True)[:top]
    return {
        "pairs": len(values),
        "mean_cosine": round(float(values.mean()), 4),
        "max_cosine": round(float(values.max()), 4),
        "closest": [
            {"effects": [names[int(i[k])], names[int(j[k])]], "cosine": round(float(values[k]), 4)}
            for k in order
        ],
    }
