"""Image and prompt encoders for the preference cache: the SD3 VAE and SD3's three text encoders.

Prompts are encoded **exactly as ComfyUI encodes them by default for SD3** (CLIPTextEncode on an
SD3 CLIP; ComfyUI 0.3.64 `comfy/text_encoders/sd3_clip.py`, `comfy/sd1_clip.py`, `comfy/sdxl_clip.py`),
so a DRM trained on this cache scores ComfyUI's CONDITIONING as it scored its training data:

* Tokenisation as ComfyUI's `SDTokenizer.tokenize_with_weights`: "(word:1.2)" / "(word)" weight
  syntax and "\\(" escapes are parsed; every segment is tokenised on its own; CLIP gets chunks of 77
  tokens (start, <=75 tokens, end, padding; words of 8+ tokens are split across chunks, shorter
  words move whole to the next chunk); CLIP-L pads with its end token, CLIP-G with token 0; T5 gets
  the tokens, its end token, and padding with 0 up to a minimum of 77. " embedding:name" is treated
  as a textual-inversion embedding that is not installed: the name is dropped, as ComfyUI does.
* CLIP-L and CLIP-G: hidden states of the penultimate layer, *without* the final layer norm, no
  attention mask (causal only), concatenated on features (768 + 1280) and zero-padded to 4096.
* T5-XXL: last hidden state (after its final layer norm), no attention mask.
* context = [CLIP-L+G chunks (77 each), T5 tokens] on the token axis: 154 tokens for a short prompt.
* pooled = [CLIP-L pooled *unprojected*, CLIP-G pooled *projected*] = 2048, each taken from the final
  layer-normed hidden state at the first end token of the first chunk.
* Prompt weights: ComfyUI's rule z = (z - z_empty) * w + z_empty per weighted token, with z_empty the
  encoding of an empty token sequence of the same length; applied to CLIP-L, CLIP-G and T5.
The cache stores a fixed N = 154 tokens. A prompt longer than 75 CLIP tokens or 76 T5 tokens makes
ComfyUI's context longer; here it keeps the first CLIP chunk (77) and the first 77 T5 states (of T5
run on the full prompt), i.e. exact prefixes of ComfyUI's two parts, and is counted in `truncated`.
The weights and tokenizers are found and opened by `training.sd3_files` (ComfyUI's files, a single-file
checkpoint or a diffusers folder); this module only encodes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from drm_core import DRMError
from drm_core.latents import SD3_LATENT_CHANNELS, SD3_LATENT_SCALE, SD3_LATENT_SHIFT, to_model_space

from .sd3_files import CONTEXT_DIM, POOLED_DIM, SD3TextFiles, load_sd3_vae, open_text_encoders

log = logging.getLogger(__name__)

CLIP_LENGTH = 77
T5_MIN_LENGTH = 77
CONTEXT_TOKENS = CLIP_LENGTH + T5_MIN_LENGTH  # 154, the fixed N of a cache
MAX_WORD_TOKENS = 8  # ComfyUI: words of this many tokens or more may be split across CLIP chunks
EMBEDDING_PREFIX = "embedding:"

COMFYUI_SD3_SCHEME = {
    "scheme": "comfyui-sd3", "tokens": CONTEXT_TOKENS, "clip_layer": "penultimate",
    "clip_final_layer_norm": False, "clip_l_pad": "end", "clip_g_pad": 0, "t5_min_length": T5_MIN_LENGTH,
    "t5_attention_mask": False, "pooled": "clip_l unprojected + clip_g projected",
    "weights": "comfyui", "long_prompts": "first CLIP chunk + first 77 T5 states",
}


class TextEncoder(Protocol):
    """Anything that turns prompts into SD3 conditioning (tests pass fakes)."""

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(context [B, N, 4096], pooled [B, 2048]), float32 on any device."""
        ...


class ImageEncoder(Protocol):
    """Anything that turns images into model-space SD3 latents (tests pass fakes)."""

    def encode(self, images: list[Image.Image], ids: list[int]) -> Tensor:
        """Model-space latents [B, 16, h, w]; `ids` seed each image's sampling noise."""
        ...


# ----------------------------------------------------------------------------- prompt parsing (ComfyUI)

def _escape(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def _unescape(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")


def _split_parentheses(text: str) -> list[str]:
    """Top-level pieces of `text`, each "(...)" group one piece (ComfyUI's parse_parentheses, quirks kept)."""
    pieces, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _token_weights(text: str, weight: float) -> list[tuple[str, float]]:
    """(segment, weight) pairs: "(x)" multiplies by 1.1, "(x:w)" sets w, nesting recurses."""
    out: list[tuple[str, float]] = []
    for piece in _split_parentheses(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, inner_weight = piece[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _token_weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """A prompt as (text segment, weight) pairs, exactly as ComfyUI splits it before tokenising."""
    return [(_unescape(segment), weight) for segment, weight in _token_weights(_escape(text), 1.0)]


def _words(segment: str) -> list[str]:
    """The pieces ComfyUI tokenises separately within a segment (text around " embedding:" names)."""
    split = re.split(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}", segment)
    pieces = [split[0]] + [EMBEDDING_PREFIX + rest for rest in split[1:]]
    words = []
    for word in pieces:
        if word.startswith(EMBEDDING_PREFIX):
            word = _drop_missing_embedding(word[len(EMBEDDING_PREFIX):].strip("\n"))
        if word:
            words.append(word)
    return words


def _drop_missing_embedding(name_and_rest: str) -> str:
    """What ComfyUI keeps of "embedding:<name> rest" when <name> is not installed: the rest."""
    parts = name_and_rest.split()
    if not parts:
        return ""
    name, leftover = parts[0], " ".join(parts[1:])
    stripped = name.strip(",")
    if len(stripped) < len(name):
        leftover = f"{name[len(stripped):]} {leftover}"
    return leftover


# ----------------------------------------------------------------------------- tokenisation (ComfyUI)

@dataclass(frozen=True)
class TokenScheme:
    """How one of SD3's tokenizers is driven (ComfyUI's SDTokenizer settings)."""

    start: int | None
    end: int
    pad: int
    max_length: int = CLIP_LENGTH
    pad_to_max_length: bool = True
    min_length: int | None = None


def clip_scheme(tokenizer: Any, pad_with_end: bool) -> TokenScheme:
    """CLIP: start and end tokens from tokenizing ""; pad with the end token (CLIP-L) or 0 (CLIP-G)."""
    empty = tokenizer("")["input_ids"]
    return TokenScheme(start=empty[0], end=empty[1], pad=empty[1] if pad_with_end else 0)


def t5_scheme(tokenizer: Any) -> TokenScheme:
    """T5: no start token, end token from tokenizing "", pad 0, no chunking, at least 77 tokens."""
    return TokenScheme(start=None, end=tokenizer("")["input_ids"][0], pad=0, max_length=10**8,
                       pad_to_max_length=False, min_length=T5_MIN_LENGTH)


def tokenize(text: str, tokenizer: Any, scheme: TokenScheme) -> list[list[tuple[int, float]]]:
    """Chunks of (token, weight) exactly as ComfyUI's SDTokenizer.tokenize_with_weights builds them."""
    strip_start = 0 if scheme.start is None else 1
    groups = [[(t, weight) for t in tokenizer(word)["input_ids"][strip_start:-1]]
              for segment, weight in parse_prompt(text) for word in _words(segment)]
    start = [] if scheme.start is None else [(scheme.start, 1.0)]
    end, pad = (scheme.end, 1.0), (scheme.pad, 1.0)
    batch = list(start)
    chunks = [batch]
    for group in groups:
        is_large = len(group) >= MAX_WORD_TOKENS
        while group:
            if len(group) + len(batch) > scheme.max_length - 1:
                remaining = scheme.max_length - len(batch) - 1
                if is_large:
                    batch.extend(group[:remaining])
                    batch.append(end)
                    group = group[remaining:]
                else:
                    batch.append(end)
                    if scheme.pad_to_max_length:
                        batch.extend([pad] * remaining)
                batch = list(start)
                chunks.append(batch)
            else:
                batch.extend(group)
                group = []
    batch.append(end)
    if scheme.pad_to_max_length and len(batch) < scheme.max_length:
        batch.extend([pad] * (scheme.max_length - len(batch)))
    if scheme.min_length is not None and len(batch) < scheme.min_length:
        batch.extend([pad] * (scheme.min_length - len(batch)))
    return chunks


def empty_tokens(scheme: TokenScheme, length: int) -> list[int]:
    """ComfyUI's gen_empty_tokens: [start,] end, then padding, `length` in all (the weighting baseline)."""
    tokens = ([] if scheme.start is None else [scheme.start]) + [scheme.end]
    return tokens + [scheme.pad] * (length - len(tokens))


def apply_weights(z: Tensor, weights: Tensor, z_empty: Tensor) -> Tensor:
    """ComfyUI's prompt weighting on one sequence: z = (z - z_empty) * w + z_empty where w != 1."""
    weighted = (z - z_empty) * weights[:, None] + z_empty
    return torch.where((weights != 1.0)[:, None], weighted, z)


# ----------------------------------------------------------------------------- SD3 text encoder

class SD3TextEncoder:
    """CLIP-L + CLIP-G + T5-XXL encoding prompts as ComfyUI does for SD3 (see the module docstring)."""

    scheme = COMFYUI_SD3_SCHEME

    def __init__(self, clip_l: Any, clip_g: Any, t5: Any, tokenizer_l: Any, tokenizer_g: Any,
                 tokenizer_t5: Any, device: str | torch.device = "cpu"):
        self.clip_l, self.clip_g, self.t5 = (m.to(device).eval() for m in (clip_l, clip_g, t5))
        self.tokenizers = (tokenizer_l, tokenizer_g, tokenizer_t5)
        for tok in self.tokenizers:
            tok.model_max_length = 10**8  # we chunk ourselves; silences "sequence too long" warnings
        self.schemes = (clip_scheme(tokenizer_l, pad_with_end=True), clip_scheme(tokenizer_g, pad_with_end=False),
                        t5_scheme(tokenizer_t5))
        self.device = torch.device(device)
        self.truncated = 0
        t5_dim = t5.config.d_model
        if t5_dim != CONTEXT_DIM:
            raise DRMError(f"T5 hidden size is {t5_dim}; SD3 conditioning needs {CONTEXT_DIM}")

    @classmethod
    def from_pretrained(cls, path: str | Path | list[str | Path], device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, tokenizers: str | Path | None = None) -> "SD3TextEncoder":
        """Load from any layout `training.sd3_files.open_text_encoders` accepts: ComfyUI's models/text_encoders/
        folder, a single-file checkpoint that includes them, those files, or a diffusers SD3 pipeline folder;
        `tokenizers` (ComfyUI or diffusers folder) overrides where the tokenizers come from."""
        return cls.from_files(open_text_encoders(path, tokenizers), device, dtype)

    @classmethod
    def from_files(cls, files: SD3TextFiles, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> "SD3TextEncoder":
        """Build from text encoders already found and checked by `open_text_encoders` (reads the weights)."""
        return cls(*files.load_models(dtype), *files.tokenizers, device=device)

    def tokenize(self, prompt: str) -> tuple[list[list[tuple[int, float]]], ...]:
        """ComfyUI token chunks of one prompt for CLIP-L, CLIP-G and T5."""
        if EMBEDDING_PREFIX in prompt:
            log.warning("prompt uses %s...: textual-inversion embeddings are not available here, so the name is "
                        "dropped (as ComfyUI does for an embedding it cannot find): %.80r", EMBEDDING_PREFIX, prompt)
        return tuple(tokenize(prompt, tok, scheme) for tok, scheme in zip(self.tokenizers, self.schemes))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(context [B, 154, 4096], pooled [B, 2048]) float32, as ComfyUI's CLIPTextEncode (truncated to 154)."""
        tokens = [self.tokenize(p) for p in prompts]
        l_hidden, l_pooled = self._encode_clip(self.clip_l, [t[0][0] for t in tokens], self.schemes[0], project=False)
        g_hidden, g_pooled = self._encode_clip(self.clip_g, [t[1][0] for t in tokens], self.schemes[1], project=True)
        lg = torch.cat([l_hidden, g_hidden], dim=-1)  # [B, 77, 768 + 1280]
        lg = torch.nn.functional.pad(lg, (0, CONTEXT_DIM - lg.shape[-1]))
        t5 = self._encode_t5([t[2][0] for t in tokens])  # [B, 77, 4096]
        for prompt, (chunks_l, chunks_g, chunks_t5) in zip(prompts, tokens):
            if min(len(chunks_l), len(chunks_g)) > 1 or len(chunks_t5[0]) > T5_MIN_LENGTH:
                self.truncated += 1
                log.warning("prompt longer than %d tokens, truncated to the cache's %d (first CLIP chunk + first "
                            "%d T5 states): %.80r", CLIP_LENGTH - 2, CONTEXT_TOKENS, T5_MIN_LENGTH, prompt)
        return torch.cat([lg, t5], dim=1), torch.cat([l_pooled, g_pooled], dim=-1)

    def _encode_clip(self, model: Any, chunks: list[list[tuple[int, float]]], scheme: TokenScheme,
                     project: bool) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states [B, 77, D] (weighted) and pooled [B, Dp] of first CLIP chunks."""
        ids = torch.tensor([[t for t, _ in c] for c in chunks], device=self.device)
        weights = torch.tensor([[w for _, w in c] for c in chunks], device=self.device)
        weighted = (weights != 1.0).any(dim=1)
        if weighted.any():
            ids = torch.cat([ids, torch.tensor([empty_tokens(scheme, ids.shape[1])], device=self.device)])
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-2].float()  # penultimate layer, no final layer norm
        first_end = (ids == scheme.end).int().argmax(dim=1)
        pooled = out.last_hidden_state[torch.arange(len(ids), device=self.device), first_end]
        if project:
            pooled = model.text_projection(pooled)
        hidden, pooled = hidden[:len(chunks)].clone(), pooled[:len(chunks)].float()
        for i in torch.nonzero(weighted).flatten().tolist():
            hidden[i] = apply_weights(hidden[i], weights[i], out.hidden_states[-2][-1].float())
        return hidden, pooled

    def _encode_t5(self, sequences: list[list[tuple[int, float]]]) -> Tensor:
        """T5 last hidden states [B, 77, 4096]: each prompt at its full length, first 77 states kept."""
        out = torch.empty(len(sequences), T5_MIN_LENGTH, CONTEXT_DIM, device=self.device)
        for length in sorted({len(s) for s in sequences}):
            rows = [i for i, s in enumerate(sequences) if len(s) == length]
            ids = torch.tensor([[t for t, _ in sequences[i]] for i in rows], device=self.device)
            hidden = self.t5(input_ids=ids).last_hidden_state.float()
            for row, i in enumerate(rows):
                weights = torch.tensor([w for _, w in sequences[i]], device=self.device)
                if (weights != 1.0).any():
                    empty = torch.tensor([empty_tokens(self.schemes[2], length)], device=self.device)
                    z_empty = self.t5(input_ids=empty).last_hidden_state[0].float()
                    hidden[row] = apply_weights(hidden[row], weights, z_empty)
            out[rows] = hidden[:, :T5_MIN_LENGTH]
        return out


# ----------------------------------------------------------------------------- SD3 VAE encoder

def preprocess_image(image: Image.Image, resolution: int) -> Tensor:
    """RGB image -> [3, R, R] float32 in [-1, 1]: shorter side resized to R (bicubic), then center-cropped."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def image_noise(shape: tuple[int, ...], seed: int, image_id: int) -> Tensor:
    """The standard normal noise that samples image `image_id`'s latent: fixed by (seed, id), not by batching."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + image_id) % (2**63))
    return torch.randn(shape, generator=generator)


def check_resolution(resolution: int) -> None:
    """Images are encoded at a square side that is a positive multiple of 16 (an even latent side)."""
    if resolution % 16 or resolution < 16:
        raise DRMError(f"--resolution must be a positive multiple of 16 (latent side even), got {resolution}")


class SD3VAEEncoder:
    """SD3 VAE encoder: images -> model-space latents (z - 0.0609) * 1.5305, z ~ latent_dist (sampled)."""

    def __init__(self, vae: Any, resolution: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        check_resolution(resolution)
        channels = vae.config.latent_channels
        if channels != SD3_LATENT_CHANNELS:
            raise DRMError(f"VAE has {channels} latent channels; SD3 latents have {SD3_LATENT_CHANNELS}")
        shift, scale = vae.config.get("shift_factor"), vae.config.get("scaling_factor")
        if shift is None or abs(shift - SD3_LATENT_SHIFT) > 1e-6 or abs(scale - SD3_LATENT_SCALE) > 1e-6:
            log.warning("VAE config has shift_factor=%s scaling_factor=%s; using SD3's %s / %s (the model space "
                        "ComfyUI and the DRM use)", shift, scale, SD3_LATENT_SHIFT, SD3_LATENT_SCALE)
        if vae.dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device).eval()
        self.resolution, self.device, self.dtype, self.seed = resolution, torch.device(device), dtype, seed

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 512, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, seed: int = 0) -> "SD3VAEEncoder":
        """Load the VAE from any layout `training.sd3_files.load_sd3_vae` accepts: a single-file checkpoint
        (first_stage_model.*), a VAE .safetensors (LDM or diffusers names), a diffusers VAE or pipeline folder."""
        check_resolution(resolution)
        return cls(load_sd3_vae(path, device, dtype), resolution, device, dtype, seed)

    @torch.no_grad()
    def encode(self, images: list[Image.Image], ids: list[int]) -> Tensor:
        """Model-space latents [B, 16, R/8, R/8] float32; each image's sample noise is fixed by (seed, id)."""
        pixels = torch.stack([preprocess_image(img, self.resolution) for img in images])
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        noise = torch.stack([image_noise(tuple(dist.mean.shape[1:]), self.seed, i) for i in ids])
        z = dist.mean.float() + dist.std.float() * noise.to(self.device)  # = latent_dist.sample()
        return to_model_space(z)
