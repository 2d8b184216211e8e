"""DRMStepwiseSampler (a SAMPLER for SamplerCustom) and DRMStepwiseKSampler (all-in-one).

Both run drm_core.stepwise_sample: at each step k SDE candidates share one CFG model evaluation, the
DRM scores them at the next sigma in one batched call, and the best one continues. The ComfyUI side
only builds velocity_fn from the CFG denoiser and reward_fn from the DRM.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..drm_core import (DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL, DRMError, StepRecord,
                        stepwise_sample)
from .common import (SEED_MAX, check_latent, check_model_matches, drm_conditioning, drm_input, named, per_image, preview,
                     schema, seed_input, unwrap_drm)
from .memory import attach_drm, load_with_generator
from .plot import trace_plot, trace_summary

log = logging.getLogger(__name__)

SDE_SEED_SALT = 0x5DEECE66D
"""The SDE noise stream is seeded with seed XOR this salt, so it never replays the initial noise
(ComfyUI draws the initial noise from torch.manual_seed(seed) on the CPU)."""


def sde_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Generator for the SDE / candidate noise of one sampling run, on the latent's device like ComfyUI's own
    SDE samplers, so candidate noise is drawn where it is used (None: unseeded, global RNG)."""
    if seed is None:
        log.warning("DRM step-wise sampling: the sampler got no seed; candidate noise is not reproducible")
        return None
    seed = (int(seed) ^ SDE_SEED_SALT) & SEED_MAX
    try:
        return torch.Generator(device).manual_seed(seed)
    except RuntimeError:  # a backend without device generators: draw on the host and copy
        log.info("DRM step-wise sampling: no torch.Generator on %s; candidate noise is drawn on the CPU", device)
        return torch.Generator("cpu").manual_seed(seed)


def sample_stepwise(model, x, sigmas, extra_args=None, callback=None, disable=None, *, drm, context, pooled, k,
                    noise_level, branch_range, branch_every, plain_noise_level, node, trace=None):
    """KSAMPLER function: Step-wise Sampling (DRM paper §3.2) with the CFG denoiser `model` and the DRM.

    x: model-space latent at sigmas[0] (ComfyUI already applied sigma * noise + (1 - sigma) * latent).
    `model(x, sigma * ones[B], **extra_args)` returns the CFG-combined x0; v = (x - x0) / sigma.
    """
    extra_args = {} if extra_args is None else extra_args
    guider = getattr(model, "inner_model", None)  # the CFG guider: its model_patcher was loaded for sampling
    reward_model = unwrap_drm(drm, node)
    check_model_matches(getattr(guider, "inner_model", None), reward_model, node)
    load_with_generator(guider.model_patcher, drm, x.shape, k, context.shape[1])
    batch = x.shape[0]
    prompt = reward_model.embed_prompt(per_image(context, batch), per_image(pooled, batch))  # once per run

    def velocity_fn(x_t, sigma):  # sigma: a host scalar, so filling it on the device is not a transfer
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = float(sigma.to(x_t.dtype))
        denoised = model(x_t, x_t.new_full([batch], sigma), **extra_args)
        return (x_t - denoised) / sigma

    def reward_fn(candidates, sigma):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return reward_model.score_embedded(candidates, sigma, prompt).to(candidates.device)

    with tqdm(total=len(sigmas) - 1, disable=disable) as bar:
        def on_step(i, x_next, denoised):
            bar.update(i + 1 - bar.n)
            if callback is not None:
                callback({"x": x_next, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

        try:
            result = stepwise_sample(velocity_fn, reward_fn, x, sigmas, k, noise_level,
                                     sde_generator(extra_args.get("seed"), x.device), branch_range=branch_range,
                                     branch_every=branch_every, plain_noise_level=plain_noise_level, callback=on_step)
        except DRMError as err:
            raise named(node, err) from err
    if trace is not None:
        trace.extend(result.trace)
    return result.latent


def sampler_options(drm, conditioning, k, noise_level, branch_start, branch_end, branch_every, outside_range,
                    node) -> dict:
    """Validated KSAMPLER extra_options shared by both nodes."""
    reward_model = unwrap_drm(drm, node)
    context, pooled = drm_conditioning(conditioning, reward_model, node)
    if branch_start > branch_end:
        raise ValueError(f"{node}: branch_start ({branch_start}) must not exceed branch_end ({branch_end})")
    return {"drm": drm, "context": context, "pooled": pooled, "k": k, "noise_level": noise_level,
            "branch_range": (branch_start, branch_end), "branch_every": branch_every,
            "plain_noise_level": 0.0 if outside_range == "ode" else None, "node": node}


def search_inputs() -> list[io.Input]:
    """The search widgets; defaults are drm_core's measured defaults (docs/performance.md)."""
    return [
        io.Int.Input("k", default=DEFAULT_K, min=1, max=64, tooltip=(
            "Candidates per branched step. The DRM scores all k at once and keeps the best. k = 1 is plain SDE "
            "sampling (no DRM call). Each branched step costs k DRM calls.")),
        io.Float.Input("noise_level", default=0.7, min=0.0, max=2.0, step=0.05, tooltip=(
            "SDE noise level a of the Flow-GRPO step: how far candidates spread. 0 makes all candidates identical "
            "(Euler ODE); 0.7 is the paper's value.")),
        io.Float.Input("branch_start", default=DEFAULT_BRANCH_RANGE[0], min=0.0, max=1.0, step=0.01,
                       tooltip="Branch only from this fraction of the steps on (0 = first step)."),
        io.Float.Input("branch_end", default=DEFAULT_BRANCH_RANGE[1], min=0.0, max=1.0, step=0.01, tooltip=(
            "Stop branching at this fraction of the steps (1 = through the last step, as in the paper). The default "
            "0.5 with ODE steps after it kept about 90% of the full k = 6 gain at half the DRM cost in our "
            "measurements.")),
        io.Int.Input("branch_every", default=1, min=1, max=1000,
                     tooltip="Branch on every m-th step inside the range (1 = every step)."),
        io.Combo.Input("outside_range", options=["sde", "ode"],
                       default="ode" if DEFAULT_PLAIN_NOISE_LEVEL == 0.0 else "sde", tooltip=(
                           "Steps that do not branch: 'ode' a deterministic Euler step (default: late SDE noise "
                           "costs quality), 'sde' one stochastic step at the same noise level.")),
    ]


def check_branch_range(branch_start: float | None = None, branch_end: float | None = None) -> bool | str:
    """validate_inputs of the sampler nodes: 0 <= branch_start <= branch_end <= 1 (when both are widgets)."""
    for name, value in (("branch_start", branch_start), ("branch_end", branch_end)):
        if value is not None and not 0.0 <= value <= 1.0:
            return f"{name} must be a fraction of the steps from 0 to 1, got {value:g}"
    if branch_start is not None and branch_end is not None and branch_start > branch_end:
        return f"branch_start ({branch_start:g}) must not exceed branch_end ({branch_end:g})"
    return True


def schedule(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler would use: `steps` steps of the schedule, the last ones of a longer one for denoise < 1."""
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


class DRMStepwiseSampler(io.ComfyNode):
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: step-wise sampling with a DRM."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMStepwiseSampler", display_name="DRM Step-wise Sampler (reward guidance)",
            aliases=["guidance", "reward guidance", "reward", "stepwise", "search sampler"],
            description=("Step-wise Sampling with a DRM, as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: at "
                         "each step it draws k stochastic (SDE) candidates from one model call, scores them with the "
                         "DRM at the next noise level and continues from the best. Works with any SD3 schedule, "
                         "shift, CFG, LoRA, batch size and denoise. The sampler's noise seed makes it reproducible."),
            inputs=[
                drm_input(),
                io.Conditioning.Input("conditioning", tooltip=(
                    "The prompt the DRM scores candidates against: connect the same positive conditioning as the "
                    "sampler (SD3 CLIPTextEncode; first entry and pooled_output are used).")),
                *search_inputs(),
            ],
            outputs=[io.Sampler.Output("sampler", display_name="sampler", tooltip=(
                "Connect to the 'sampler' input of SamplerCustom / SamplerCustomAdvanced."))],
        )

    @classmethod
    def validate_inputs(cls, branch_start: float | None = None, branch_end: float | None = None) -> bool | str:
        return check_branch_range(branch_start, branch_end)

    @classmethod
    def execute(cls, drm, conditioning, k, noise_level, branch_start, branch_end, branch_every,
                outside_range) -> io.NodeOutput:
        options = sampler_options(drm, conditioning, k, noise_level, branch_start, branch_end, branch_every,
                                  outside_range, "DRMStepwiseSampler")
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_stepwise, extra_options=options))


class DRMStepwiseKSampler(io.ComfyNode):
    """All-in-one step-wise sampling, with the reward trace drawn on the node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DRMStepwiseKSampler", display_name="DRM Step-wise KSampler (reward guidance, all-in-one)",
            aliases=["guidance", "reward guidance", "reward", "stepwise", "ksampler"],
            description=("All-in-one Step-wise Sampling for KSampler users: samples an SD3 latent where each step "
                         "keeps the best of k DRM-scored SDE candidates, and draws the reward trace (chosen score "
                         "and best-minus-second margin per step). Same result as SamplerCustom + "
                         "DRMStepwiseSampler. The DRM is loaded and budgeted together with the MODEL."),
            inputs=[
                io.Model.Input("model", tooltip="An SD3-family diffusion model (SD3.5 Medium), with LoRAs if any."),
                drm_input(),
                io.Conditioning.Input("positive", tooltip=(
                    "Positive prompt; the DRM also scores against it unless reward_conditioning is connected.")),
                io.Conditioning.Input("negative", tooltip="Negative prompt for classifier-free guidance."),
                io.Latent.Input("latent_image", tooltip=(
                    "Latent to denoise: EmptySD3LatentImage, or an encoded image with denoise < 1.")),
                seed_input("Seed of the initial noise and of every candidate: the same seed gives the same image."),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (SD3.5 Medium: about 4.5)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Sigma schedule (any; SD3 uses its shift)."),
                *search_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run (below 1 for image-to-image)."),
                io.Conditioning.Input("reward_conditioning", optional=True, tooltip=(
                    "Optional separate prompt for the DRM to score against (default: positive).")),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The sampled latent (decode it with the SD3 VAE)."),
                io.Image.Output("reward_trace", display_name="reward_trace", tooltip=(
                    "Plot of the chosen DRM score and the best-minus-second margin at every branched step (also "
                    "shown on the node).")),
            ],
        )

    @classmethod
    def validate_inputs(cls, branch_start: float | None = None, branch_end: float | None = None) -> bool | str:
        return check_branch_range(branch_start, branch_end)

    @classmethod
    def execute(cls, model, drm, positive, negative, latent_image, seed, steps, cfg, scheduler, k, noise_level,
                branch_start, branch_end, branch_every, outside_range, denoise,
                reward_conditioning=None) -> io.NodeOutput:
        node = "DRMStepwiseKSampler"
        reward_model = unwrap_drm(drm, node)
        check_model_matches(model.model, reward_model, node)
        trace: list[StepRecord] = []
        options = sampler_options(drm, reward_conditioning or positive, k, noise_level, branch_start, branch_end,
                                  branch_every, outside_range, node)
        model = attach_drm(model, drm, k, options["context"].shape[1])  # loaded and budgeted with the generator
        sampler = comfy.samplers.KSAMPLER(sample_stepwise, extra_options={**options, "trace": trace})
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        check_latent(samples, reward_model, node, "latent_image")
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        sigmas = schedule(model, scheduler, steps, denoise)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, samples,
                                         noise_mask=latent_image.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        picture = trace_plot(trace, len(sigmas) - 1)  # [H, W, 3] uint8
        image = torch.from_numpy(picture).float().div(255).unsqueeze(0)  # [1, H, W, 3]
        return io.NodeOutput({**latent_image, "samples": out}, image, ui=preview(picture, trace_summary(trace)))
