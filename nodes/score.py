"""DRMScoreLatent, DRMScoreImage, DRMSelectBest: score a batch with the DRM and keep the best of it."""

from __future__ import annotations

import torch
from comfy_api.latest import io
from torch import Tensor

from ..drm_core import DRM, DRMError, add_noise, to_model_space
from .common import (check_drm_kind, check_latent, drm_conditioning, drm_input, named, per_image, preview, schema,
                     seed_input, unwrap_drm)
from .memory import load_for_scoring
from .plot import scores_plot

AUTO_SIGMA = -1.0


def score_inputs() -> list[io.Input]:
    """The sigma and seed widgets shared by both scoring nodes."""
    return [
        io.Float.Input("sigma", default=AUTO_SIGMA, min=AUTO_SIGMA, max=1.0, step=0.01, tooltip=(
            "Noise level to score at. -1 = auto: the model's recommendation, stored in its file (0, the clean "
            "latent, for DRMs trained with train-drm; 0.1 on its timestep table, 0.100746, for DiNa-LRM). 0 = the "
            "clean latent. Above 0 the latent is first noised with x = (1 - sigma) * latent + sigma * noise, as the "
            "DRM sees intermediate steps during sampling. The summary says which sigma was used.")),
        seed_input("Seed of the noise added when the sigma used is above 0 (same seed, same scores). Unused at "
                   "sigma 0."),
    ]


def check_sigma(sigma: float | None) -> bool | str:
    """validate_inputs for the scoring nodes: -1 (auto) or a noise level in [0, 1]."""
    if sigma is None or sigma == AUTO_SIGMA or 0.0 <= sigma <= 1.0:
        return True
    return f"sigma must be -1 (auto: the model's recommendation) or a noise level from 0 to 1, got {sigma:g}"


SCORE_OUTPUTS = [
    io.Float.Output("scores", display_name="scores", is_output_list=True,
                    tooltip="One score per latent, in batch order (a list: connect it to DRMSelectBest)."),
    io.String.Output("summary", display_name="summary",
                     tooltip="The scores as readable text (also shown on the node)."),
]


def scoring_sigma(drm: DRM, sigma: float) -> tuple[float, str]:
    """(sigma to score at, where it came from): a negative widget value means the model's recommendation."""
    if sigma >= 0:
        return float(sigma), "as set"
    convention = drm.scoring
    used = convention.recommended_sigma
    if used != convention.sigma:
        return used, f"model's recommendation: {convention.sigma:g} on its timestep table"
    return used, "model's recommendation"


def score_latents(drm_patcher, raw: Tensor, conditioning, sigma: float, seed: int, node: str) -> tuple[list, str]:
    """Scores of raw-VAE-space latents [B, 16, h, w] as (list of B floats, summary text); sigma < 0 = auto."""
    drm = unwrap_drm(drm_patcher, node)
    check_drm_kind(drm, node)
    check_latent(raw, drm, node)
    context, pooled = drm_conditioning(conditioning, drm, node)
    sigma, source = scoring_sigma(drm, sigma)
    batch = raw.shape[0]
    x = to_model_space(raw.float())
    if sigma > 0:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        x = add_noise(x, noise, sigma)
    chunk = load_for_scoring(drm_patcher, batch, *x.shape[-2:], context.shape[1])
    try:
        scores = drm.score(x, sigma, per_image(context, batch), per_image(pooled, batch), chunk).cpu().tolist()
    except DRMError as err:
        raise named(node, err) from err
    return scores, summarize(scores, sigma, source)


def scored(scores: list[float], summary: str) -> io.NodeOutput:
    """The scoring nodes' outputs, with the scores drawn and written on the node."""
    return io.NodeOutput(scores, summary, ui=preview(scores_plot(scores), summary))


def summarize(scores: list[float], sigma: float, source: str) -> str:
    best = max(range(len(scores)), key=scores.__getitem__)
    lines = [f"DRM scores at sigma {sigma:.6g} ({source}), higher is preferred; batch order:"]
    lines += [f"  #{i}: {s:+.4f}{'  <- best' if i == best else ''}" for i, s in enumerate(scores)]
    return "\n".join(lines)


class DRMScoreLatent(io.ComfyNode):
    """Score every latent of a batch against a prompt."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMScoreLatent", display_name="DRM Score Latent (reward)",
            aliases=["reward", "score latent", "aesthetic score", "preference score"],
            description=("Scores every latent of a batch with the DRM against a prompt: one reward per latent, in "
                         "batch order (higher = more preferred). Works on clean latents or at any noise level; by "
                         "default at the noise level the model's file recommends. No VAE decode needed."),
            inputs=[
                drm_input(),
                io.Latent.Input("latent", tooltip="SD3 latents to score (e.g. a sampler's output), any batch size."),
                io.Conditioning.Input("conditioning", tooltip=(
                    "The prompt to score against: an SD3 CLIPTextEncode output (its first entry and pooled_output "
                    "are used). Usually the sampler's positive conditioning.")),
                *score_inputs(),
            ],
            outputs=SCORE_OUTPUTS,
        )

    @classmethod
    def validate_inputs(cls, sigma: float | None = None) -> bool | str:
        return check_sigma(sigma)

    @classmethod
    def execute(cls, drm, latent, conditioning, sigma: float, seed: int) -> io.NodeOutput:
        return scored(*score_latents(drm, latent["samples"], conditioning, sigma, seed, "DRMScoreLatent"))


class DRMScoreImage(io.ComfyNode):
    """VAE-encode images, then score them like DRMScoreLatent."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMScoreImage", display_name="DRM Score Image (reward)",
            aliases=["reward", "score image", "aesthetic score", "preference score"],
            description=("Scores every image of a batch with the DRM: the images are VAE-encoded to SD3 latents, "
                         "then scored like DRMScoreLatent. Use it for images that were loaded or edited, not "
                         "sampled."),
            inputs=[
                drm_input(),
                io.Image.Input("image", tooltip="Images to score (any batch size); sides should be multiples of 16 px."),
                io.Vae.Input("vae", tooltip="An SD3 VAE (16-channel latents), e.g. the one in "
                                            "sd3.5_medium.safetensors."),
                io.Conditioning.Input("conditioning", tooltip=(
                    "The prompt to score against: an SD3 CLIPTextEncode output (its first entry and pooled_output "
                    "are used).")),
                *score_inputs(),
            ],
            outputs=SCORE_OUTPUTS,
        )

    @classmethod
    def validate_inputs(cls, sigma: float | None = None) -> bool | str:
        return check_sigma(sigma)

    @classmethod
    def execute(cls, drm, image, vae, conditioning, sigma: float, seed: int) -> io.NodeOutput:
        channels = getattr(vae, "latent_channels", None)
        if channels is not None and channels != 16:
            raise ValueError(f"DRMScoreImage: the VAE makes {channels}-channel latents; the DRM needs an SD3 VAE "
                             "(16 channels), e.g. the VAE output of the SD3.5 checkpoint loader")
        raw = vae.encode(image[:, :, :, :3])
        return scored(*score_latents(drm, raw, conditioning, sigma, seed, "DRMScoreImage"))


def _take(value, batch: int, index: Tensor, batched_ndim: int | None = None):
    """Rows `index` of a per-batch tensor; anything shared by the whole batch (first dim 1, or fewer than
    `batched_ndim` dimensions, e.g. a single [H, W] mask) passes through unchanged."""
    if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != batch or \
            (batched_ndim is not None and value.ndim < batched_ndim):
        return value
    return value[index.to(value.device)]


def _concat(values: list, what: str):
    values = [v for v in values if v is not None]
    if not values:
        return None
    if len(values) > 1 and any(v.shape[1:] != values[0].shape[1:] for v in values):
        raise ValueError(f"DRMSelectBest: the {what} list holds tensors of different sizes; select from one batch")
    return torch.cat(values) if len(values) > 1 else values[0]


class DRMSelectBest(io.ComfyNode):
    """Keep the top-k of a batch by score, with its images and masks in step."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMSelectBest", display_name="DRM Select Best (best-of-N, top-k)",
            aliases=["best of n", "best-of-n", "top k", "rank", "pick best", "reward"],
            description=("Keeps the top-k of a batch by score (best first), carrying the LATENT and, if connected, "
                         "the IMAGE and MASK of the same batch along, so they stay in step. Feed it the scores of "
                         "DRMScoreLatent or DRMScoreImage: best-of-N sampling."),
            is_input_list=True,
            inputs=[
                io.Float.Input("scores", force_input=True,
                               tooltip="One score per batch item, from DRMScoreLatent / DRMScoreImage."),
                io.Latent.Input("latent", tooltip="The batch that was scored (same order as the scores)."),
                io.Int.Input("top_k", default=1, min=1, max=4096,
                             tooltip="How many items to keep (clamped to the batch size)."),
                io.Image.Input("image", optional=True,
                               tooltip="Decoded images of the same batch, kept in step with the latents."),
                io.Mask.Input("mask", optional=True, tooltip="Masks of the same batch, kept in step with the latents."),
            ],
            outputs=[
                io.Latent.Output("best_latent", display_name="latent",
                                 tooltip="The top-k latents, best first (noise_mask and batch_index follow)."),
                io.Image.Output("best_image", display_name="image",
                                tooltip="The matching images (only when an image was connected)."),
                io.Mask.Output("best_mask", display_name="mask", tooltip=(
                    "The matching masks (only when a mask was connected; a single shared mask passes through).")),
                io.Int.Output("indices", display_name="indices", is_output_list=True,
                              tooltip="Batch indices of the kept items, best first."),
                io.String.Output("summary", display_name="summary", tooltip="What was kept, as text."),
            ],
        )

    @classmethod
    def execute(cls, scores, latent, top_k, image=None, mask=None) -> io.NodeOutput:
        top_k = top_k[0]
        samples = _concat([item["samples"] for item in latent], "latent")
        batch = samples.shape[0]
        if len(scores) != batch:
            raise ValueError(f"DRMSelectBest: got {len(scores)} scores for a batch of {batch} latents; score the "
                             "same batch you select from")
        order = torch.tensor(scores, dtype=torch.float64).argsort(descending=True, stable=True)[:min(top_k, batch)]
        out = {k: _take(v, batch, order, batched_ndim=4) for k, v in latent[0].items()} if len(latent) == 1 else {}
        out["samples"] = samples[order]
        if isinstance(out.get("batch_index"), list):
            out["batch_index"] = [out["batch_index"][i] for i in order.tolist()]
        images = _concat(image or [], "image")
        if images is not None and images.shape[0] != batch:
            raise ValueError(f"DRMSelectBest: the image batch has {images.shape[0]} images for {batch} latents")
        masks = _concat(mask or [], "mask")
        kept = order.tolist()
        summary = "kept (best first): " + ", ".join(f"#{i} ({scores[i]:+.4f})" for i in kept)
        return io.NodeOutput(out, _take(images, batch, order), _take(masks, batch, order, batched_ndim=3), kept,
                             summary, ui=preview(scores_plot(scores, kept), summary))
