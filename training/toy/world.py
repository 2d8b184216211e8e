"""The toy world's fixed parts: digit images, an exactly invertible "VAE", prompts, and the true reward.

- Images: scikit-learn's 8x8 digits, upsampled to 16x16, in [-1, 1] (1797 images, 10 classes).
- "VAE": 4x4 space-to-depth, 1x16x16 pixels <-> 16x4x4 latents, stored in raw SD3 VAE space
  (z = latent / 1.5305 + 0.0609) so that ComfyUI's and our model-space conversion apply unchanged.
- Prompts: "a handwritten digit c"; the "text encoder" is a fixed random table giving SD3-shaped
  conditioning (4 tokens x 4096 and a pooled 2048-vector); prompt 10 is the empty prompt (zeros).
- Ground-truth reward: prompt fidelity (log-probability of the prompted digit under a classifier fit
  on real digits) plus composition/aesthetics: ink mass near a target 20% above the data mean (an
  interior optimum, so there is headroom), crisp strokes (little grey), and a centred digit.
  Composition terms are measured in units of their spread over the real digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from drm_core import to_model_space, to_raw_space

N_CLASSES = 10
NULL_PROMPT = 10
TEXT_TOKENS = 4
CONTEXT_DIM, POOLED_DIM = 4096, 2048


def load_digits() -> tuple[Tensor, Tensor]:
    """Digits as [1797, 1, 16, 16] float32 in [-1, 1] and labels [1797]."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(data.target, dtype=torch.int64)


def encode(images: Tensor) -> Tensor:
    """Pixels [B, 1, 16, 16] -> raw "VAE" latents [B, 16, 4, 4] (exactly invertible)."""
    return to_raw_space(F.pixel_unshuffle(images, 4))


def decode(raw: Tensor) -> Tensor:
    """Raw "VAE" latents [B, 16, 4, 4] -> pixels [B, 1, 16, 16]."""
    return F.pixel_shuffle(to_model_space(raw), 4)


def decode_model_space(latents: Tensor) -> Tensor:
    """Model-space latents -> pixels: the model-space latent is the space-to-depth of the image."""
    return F.pixel_shuffle(latents, 4)


def prompt_text(c: int) -> str:
    return "" if c == NULL_PROMPT else f"a handwritten digit {c}"


class ToyTextEncoder:
    """Fixed random SD3-shaped conditioning per prompt id: context [B, 4, 4096], pooled [B, 2048]."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed + 17)
        self.context = torch.randn(N_CLASSES + 1, TEXT_TOKENS, CONTEXT_DIM, generator=g)
        self.pooled = torch.randn(N_CLASSES + 1, POOLED_DIM, generator=g)
        self.context[NULL_PROMPT] = 0
        self.pooled[NULL_PROMPT] = 0

    def __call__(self, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.context[prompt_ids], self.pooled[prompt_ids]


@dataclass
class RewardWeights:
    fidelity: float = 1.0
    ink: float = 0.5
    crisp: float = 0.5
    center: float = 0.5
    ink_target_ratio: float = 1.15


class GroundTruthReward:
    """R(image, prompt) = fidelity + composition/aesthetics, with every term in data-standard units."""

    def __init__(self, images: Tensor, labels: Tensor, weights: RewardWeights | None = None):
        from sklearn.linear_model import LogisticRegression

        self.w = weights or RewardWeights()
        feats = self._features(images)
        self.classifier = LogisticRegression(max_iter=2000, C=0.5).fit(feats.numpy(), labels.numpy())
        ink, grey, offset = self._composition(images)
        self.ink_target = float(ink.mean()) * self.w.ink_target_ratio
        self.ink_scale = 2 * float(ink.std())
        self.grey_mean, self.grey_scale = float(grey.mean()), float(grey.std())
        self.offset_scale = 2 * float(offset.mean()) + 1e-3

    @staticmethod
    def _features(images: Tensor) -> Tensor:
        return F.avg_pool2d(images.clamp(-1, 1), 2).flatten(1)  # [B, 64]

    @staticmethod
    def _composition(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ink = ((images.clamp(-1, 1) + 1) / 2)[:, 0]  # [B, 16, 16] in [0, 1]
        mass = ink.mean((1, 2))
        grey = (4 * ink * (1 - ink)).mean((1, 2))
        coords = torch.arange(16, dtype=torch.float32) - 7.5
        total = ink.sum((1, 2)) + 1e-6
        cy = (ink.sum(2) * coords).sum(1) / total
        cx = (ink.sum(1) * coords).sum(1) / total
        return mass, grey, torch.sqrt(cx**2 + cy**2)

    def terms(self, images: Tensor, prompts: Tensor) -> dict[str, Tensor]:
        """Each term of the reward for pixel images [B, 1, 16, 16] and prompt ids [B]."""
        log_p = torch.tensor(self.classifier.predict_log_proba(self._features(images).numpy()), dtype=torch.float32)
        fidelity = log_p[torch.arange(len(prompts)), prompts.clamp(max=N_CLASSES - 1)].clamp(min=-10.0)
        ink, grey, offset = self._composition(images)
        return {"fidelity": fidelity,
                "ink": -(((ink - self.ink_target) / self.ink_scale) ** 2),
                "crisp": -(grey - self.grey_mean) / self.grey_scale,
                "center": -((offset / self.offset_scale) ** 2)}

    def __call__(self, images: Tensor, prompts: Tensor) -> Tensor:
        t = self.terms(images, prompts)
        w = self.w
        return w.fidelity * t["fidelity"] + w.ink * t["ink"] + w.crisp * t["crisp"] + w.center * t["center"]


def bradley_terry_labels(reward_a: Tensor, reward_b: Tensor, temperature: float,
                         generator: torch.Generator) -> Tensor:
    """Sample human-like labels: P(a preferred) = sigmoid((R_a - R_b) / temperature) -> bool [P]."""
    p = torch.sigmoid((reward_a - reward_b) / temperature)
    return torch.rand(p.shape, generator=generator) < p


def as_numpy_grid(images: Tensor, rows: int) -> np.ndarray:
    """[B, 1, 16, 16] in [-1, 1] -> one uint8 grid image with `rows` rows (for PNGs)."""
    b = images.shape[0]
    cols = (b + rows - 1) // rows
    pad = torch.full((rows * cols - b, *images.shape[1:]), -1.0)
    x = torch.cat([images.clamp(-1, 1), pad]).view(rows, cols, 16, 16)
    x = F.pad(x, (1, 1, 1, 1), value=0.0)
    grid = x.permute(0, 2, 1, 3).reshape(rows * 18, cols * 18)
    return ((grid + 1) * 127.5).round().byte().numpy()
