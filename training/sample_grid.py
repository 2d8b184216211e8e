"""Validation images for train-grpo: held-out samples decoded with the SD3 VAE into one PNG grid per evaluation.

    out/samples/iter_000000.png   the base model (LoRA off), written once
    out/samples/iter_000020.png   the policy at iteration 20, from the same noise
The VAE stays on the CPU between evaluations and visits the training device only to decode.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from drm_core import DRMError, to_raw_space

from .grpo_inputs import keyed
from .sd3_files import load_sd3_vae

log = logging.getLogger(__name__)


def load_vae(path: str | Path, device: torch.device | str, dtype: torch.dtype):
    """The SD3 VAE (single-file checkpoint, models/vae/ file or diffusers folder) as a frozen AutoencoderKL."""
    try:
        vae = load_sd3_vae(path, device, dtype)
    except DRMError as err:
        raise keyed("policy.vae", path, err) from err
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def decode_images(vae, latents: Tensor, device: torch.device | str) -> np.ndarray:
    """Model-space latents [B, 16, h, w] -> RGB uint8 [B, 8h, 8w, 3]; one image at a time (bounded memory)."""
    dtype = next(vae.parameters()).dtype
    images = []
    for latent in latents:
        raw = to_raw_space(latent[None].float()).to(device, dtype)  # [1, 16, h, w], raw VAE space
        pixels = vae.decode(raw).sample.float().clamp(-1, 1)  # [1, 3, 8h, 8w] in [-1, 1]
        images.append(((pixels[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu())  # [8h, 8w, 3]
    return torch.stack(images).numpy()


def image_grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """[B, H, W, 3] -> one [rows * H, columns * W, 3] image, row-major, empty cells black."""
    b, h, w, c = images.shape
    columns = min(columns, b)
    rows = math.ceil(b / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write an RGB uint8 array as PNG atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class SampleGrids:
    """Decode held-out samples with a VAE kept on the CPU; write out/samples/iter_NNNNNN.png and log it."""

    def __init__(self, vae, out: Path, device: torch.device | str, limit: int = 8, prompts: list[str] | None = None):
        self.vae, self.folder, self.device, self.limit = vae.to("cpu"), out / "samples", torch.device(device), limit
        if prompts:
            self.folder.mkdir(parents=True, exist_ok=True)
            listing = "".join(f"{i + 1}. {p}\n" for i, p in enumerate(prompts[:limit]))
            (self.folder / "prompts.txt").write_text("grid cells, row by row:\n" + listing)

    def write(self, step: int, latents: Tensor) -> tuple[Path, np.ndarray]:
        """Decode the first `limit` latents (model space) on the training device; returns the PNG path and grid."""
        self.vae.to(self.device)
        try:
            grid = image_grid(decode_images(self.vae, latents[:self.limit], self.device))
        finally:
            self.vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return save_png(grid, self.folder / f"iter_{step:06d}.png"), grid
