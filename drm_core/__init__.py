"""drm_core: the math and models of the Diffusion-based Reward Model (DRM) for SD3-family MMDiTs.

No ComfyUI, training or peft imports here: ComfyUI nodes and the trainer call the same functions.
"""

from .checkpoint import drm_from_base, load_drm, load_mmdit, read_backbone_config, read_drm_header, save_drm
from .errors import DRMError
from .grpo import candidate_log_probs, clipped_policy_loss, gaussian_kl, group_advantages
from .heads_dina import DinaHeadConfig
from .latents import (add_noise, flow_sigmas, shift_sigma, sigma_to_timestep, timestep_to_sigma, to_model_space,
                      to_raw_space, unshift_sigma)
from .model import DRM, BackboneConfig, DRMConfig, HeadConfig, PromptEmbedding
from .scoring import ScoringConvention, SigmaTable
from .sde import SDEStep, sde_log_prob, sde_sample, sde_step
from .stepwise import (DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL, SearchOptions, StepRecord,
                       StepwiseResult, branch_mask, stepwise_sample)

__all__ = [
    "DEFAULT_BRANCH_RANGE", "DEFAULT_K", "DEFAULT_PLAIN_NOISE_LEVEL", "DRM", "BackboneConfig", "DRMConfig",
    "DRMError", "DinaHeadConfig", "HeadConfig", "PromptEmbedding", "SDEStep", "ScoringConvention", "SearchOptions",
    "SigmaTable", "StepRecord", "StepwiseResult", "add_noise", "branch_mask", "candidate_log_probs",
    "clipped_policy_loss", "drm_from_base", "flow_sigmas", "gaussian_kl", "group_advantages", "load_drm", "load_mmdit",
    "read_backbone_config", "read_drm_header", "save_drm", "sde_log_prob", "sde_sample", "sde_step", "shift_sigma",
    "sigma_to_timestep", "stepwise_sample", "timestep_to_sigma", "to_model_space", "to_raw_space", "unshift_sigma",
]
