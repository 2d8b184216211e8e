"""Value training: a DRM taught on the generator's own trajectories (`train-drm` with `value.generator` set).

A standard DRM learns from clean images noised to sigma, but step-wise sampling asks it about the generator's own
intermediate states. Value training asks it that question: two siblings x_a, x_b at sigma_{j+1} share a parent
x_{sigma_j} on a sampled trajectory (one SDE step each, DRM eq. 6); each is completed to an image (by the ODE, as
the nodes' default samples after its branch range, or by the SDE), a teacher DRM scores both images at sigma 0, and
the student learns the teacher's preference P(a > b) = sigmoid(r_a - r_b) (soft Bradley-Terry labels) from the two
states alone. Its score at sigma then orders states by the reward of the images they lead to (docs/search.md).

All randomness comes from (seed, step, micro-batch), drawn for the whole global batch and sliced per process, so a
resumed run repeats an uninterrupted one and N processes see the same pairs as one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from drm_core import DRM, BackboneConfig, DRMError, flow_sigmas, read_backbone_config, sde_step

from .grpo_inputs import PromptSection

log = logging.getLogger(__name__)

VelocityFn = Callable[[Tensor, float, Tensor], Tensor]
"""velocity(x [N, ...], sigma, prompt_rows [N]) -> v [N, ...] (training.grpo_core.Policy.velocity)."""
TeacherFn = Callable[[Tensor, Tensor], Tensor]
"""teacher(images [N, ...] at sigma 0, prompt_rows [N]) -> scores [N]."""


@dataclass
class ValueSection:
    generator: str = ""  # SD3/SD3.5 checkpoint (like train-grpo's policy.base); set: train on its rollouts
    teacher: str = ""  # DRM file that scores the completed images; "": model.base (with model.init = "drm")
    steps: int = 10  # sampling schedule of the rollouts; siblings are drawn at every step but the last
    cfg_scale: float = 4.5
    noise_level: float = 0.7  # SDE noise of the trajectory and of the two sibling steps
    completion: str = "ode"  # ode: deterministic completions (measured: docs/search.md) | sde: at noise_level
    labels: str = "soft"  # soft: the teacher's P(a > b) | hard: 1 for the teacher's winner
    resolution: int = 512
    eval_pairs_per_step: int = 4  # held-out pairs per schedule step, per held-out prompt (built once)


@dataclass
class SiblingPairs:
    """Sibling states a, b [B, C, H, W] at `sigma`, their prompt rows [B], the teacher's P(a > b) [B] and scores."""

    a: Tensor
    b: Tensor
    sigma: float
    rows: Tensor
    label: Tensor
    teacher: Tensor  # [2, B]: scores of a's and b's completed images


def check_value_section(cfg: ValueSection) -> None:
    """The section's own values are in range (files are checked by `check_value_files`)."""
    if cfg.steps < 2:
        raise DRMError(f"value.steps must be >= 2 (siblings are drawn before the last step), got {cfg.steps}")
    if cfg.completion not in ("sde", "ode"):
        raise DRMError(f"value.completion must be sde or ode, got {cfg.completion!r}")
    if cfg.labels not in ("soft", "hard"):
        raise DRMError(f"value.labels must be soft or hard, got {cfg.labels!r}")
    if cfg.noise_level <= 0:
        raise DRMError(f"value.noise_level must be > 0 (siblings differ only by SDE noise), got {cfg.noise_level}")
    if cfg.resolution < 16 or cfg.resolution % 16:
        raise DRMError(f"value.resolution must be a positive multiple of 16, got {cfg.resolution}")
    if cfg.eval_pairs_per_step < 0:
        raise DRMError(f"value.eval_pairs_per_step must be >= 0, got {cfg.eval_pairs_per_step}")


def check_value_files(cfg: ValueSection, student: BackboneConfig, teacher_default: str) -> str:
    """value.generator's architecture (header only) takes the student's latents and prompts, and the teacher's
    header fits the generator; returns the teacher's path."""
    from .grpo_inputs import check_drm_file, keyed

    check_value_section(cfg)
    try:
        _, _, generator = read_backbone_config(cfg.generator)
    except DRMError as err:
        raise keyed("value.generator", cfg.generator, err) from err
    ours = {"context_dim": student.context_dim, "pooled_dim": student.pooled_dim,
            "latent channels": student.in_channels}
    theirs = {"context_dim": generator.context_dim, "pooled_dim": generator.pooled_dim,
              "latent channels": generator.in_channels}
    wrong = [f"{k} {theirs[k]} (the DRM: {ours[k]})" for k in ours if ours[k] != theirs[k]]
    if wrong:
        raise DRMError(f"value.generator = {cfg.generator}: its samples do not fit the DRM trained: {', '.join(wrong)}")
    teacher = cfg.teacher or teacher_default
    if not teacher:
        raise DRMError("value.teacher is empty: give the DRM file that scores the completed images (or continue that "
                       "DRM with model.init = \"drm\", whose model.base is then the teacher)")
    check_drm_file("value.teacher", teacher, generator, cfg.resolution, "value.generator")
    side = cfg.resolution // 8 // student.patch_size
    if side > student.pos_embed_max_size:
        raise DRMError(f"value.resolution {cfg.resolution} needs {side} patches per side; the DRM has positions for "
                       f"{student.pos_embed_max_size}")
    return teacher


def teacher_preference(score_a: Tensor, score_b: Tensor, labels: str) -> Tensor:
    """P(a > b) under the teacher's Bradley-Terry model (soft) or its hard winner."""
    diff = (score_a - score_b).float()
    return torch.sigmoid(diff) if labels == "soft" else (diff > 0).float() + 0.5 * (diff == 0).float()


def soft_bradley_terry_loss(score_a: Tensor, score_b: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy of sigmoid(s_a - s_b) against P(a > b) (DRM eq. 3 with soft labels; = eq. 3 when label = 1)."""
    return F.binary_cross_entropy_with_logits(score_a - score_b, label.to(score_a.dtype))


@torch.no_grad()
def sibling_pairs(velocity: VelocityFn, teacher: TeacherFn, rows: Tensor, shape: tuple[int, ...], sigmas: Tensor,
                  j: int, noise_level: float, generator: torch.Generator, completion: str = "ode",
                  labels: str = "soft", local: slice = slice(None), device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> SiblingPairs:
    """SDE trajectory from noise to sigmas[j]; two children at sigmas[j+1] from one velocity call (eq. 6); both
    completed to images; the teacher's preference as label. `rows` [G] is the global batch and every noise draw is
    [G, ...] before `local` takes this process's rows, so the pairs do not depend on the number of processes."""
    if not 0 <= j < len(sigmas) - 2:
        raise DRMError(f"sibling step j must be in [0, {len(sigmas) - 3}] for a {len(sigmas) - 1}-step schedule, "
                       f"got {j}")
    global_rows = len(rows)

    def draw(copies: int = 1) -> Tensor:
        noise = torch.randn((copies, global_rows, *shape), generator=generator)[:, local]  # [copies, B, C, H, W]
        return noise.flatten(0, 1).to(device, dtype)

    rows = rows[local].to(device)
    x = draw()  # [B, C, H, W] at sigma 1
    steps = sigmas.tolist()
    for i in range(j):
        x = sde_step(x, velocity(x, steps[i], rows), steps[i], steps[i + 1], noise_level, noise=draw()).sample
    parent = sde_step(x, velocity(x, steps[j], rows), steps[j], steps[j + 1], noise_level, noise=torch.zeros_like(x))
    eps = draw(2).unflatten(0, (2, -1))  # [2, B, C, H, W]
    siblings = (parent.mean.unsqueeze(0) + parent.std.unsqueeze(0) * eps).to(dtype)  # [2, B, C, H, W]
    both, both_rows = siblings.flatten(0, 1), rows.repeat(2)  # [2B, ...] a's then b's
    level = noise_level if completion == "sde" else 0.0
    for i in range(j + 1, len(steps) - 1):
        v = velocity(both, steps[i], both_rows)
        if steps[i + 1] == 0:
            both = both - steps[i] * v  # the last step lands on x0 (no noise)
            break
        noise = draw(2) if level else torch.zeros_like(both)
        both = sde_step(both, v, steps[i], steps[i + 1], level, noise=noise).sample
    scores = teacher(both, both_rows).float().view(2, -1)  # [2, B]
    return SiblingPairs(siblings[0], siblings[1], steps[j + 1], rows, teacher_preference(scores[0], scores[1], labels),
                        scores)


class ValueRollouts:
    """Training and held-out sibling pairs from a generator, scored by a teacher DRM (one object per run)."""

    def __init__(self, cfg: ValueSection, velocity: VelocityFn, teacher: DRM, context: Tensor, pooled: Tensor,
                 train_rows: Tensor, eval_rows: Tensor, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.velocity, self.teacher_drm, self.seed = cfg, velocity, teacher, seed
        self.context, self.pooled = context, pooled  # [M, N, D], [M, P]: every prompt's conditioning
        self.train_rows, self.eval_rows, self.device, self.dtype = train_rows, eval_rows, device, dtype
        self.sigmas = flow_sigmas(cfg.steps)
        self.shape = (teacher.config.backbone.in_channels, cfg.resolution // 8, cfg.resolution // 8)

    def teacher(self, images: Tensor, rows: Tensor) -> Tensor:
        """The teacher's score of completed images [N, ...] at sigma 0, each with its own prompt."""
        rows = rows.to(self.context.device)
        return self.teacher_drm.score(images, 0.0, self.context[rows], self.pooled[rows])

    def conditioning(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.to(self.context.device)
        return self.context[rows], self.pooled[rows]

    def pairs(self, step: int, micro: int, per_micro: int, local: slice) -> SiblingPairs:
        """The micro-batch's pairs: prompts and the sibling step j drawn from (seed, step, micro)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro)
        j = int(torch.randint(len(self.sigmas) - 2, (1,), generator=g))
        rows = self.train_rows[torch.randint(len(self.train_rows), (per_micro,), generator=g)]  # [G]
        return sibling_pairs(self.velocity, self.teacher, rows, self.shape, self.sigmas, j, self.cfg.noise_level, g,
                             self.cfg.completion, self.cfg.labels, local, self.device, self.dtype)

    def held_out(self) -> list[SiblingPairs]:
        """A fixed set of held-out pairs: every sibling step, `eval_pairs_per_step` per held-out prompt."""
        if not self.cfg.eval_pairs_per_step or not len(self.eval_rows):
            return []
        rows = self.eval_rows.repeat(self.cfg.eval_pairs_per_step)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 99_991)
        return [sibling_pairs(self.velocity, self.teacher, rows, self.shape, self.sigmas, j, self.cfg.noise_level, g,
                              self.cfg.completion, "hard", slice(None), self.device, self.dtype)
                for j in range(len(self.sigmas) - 2)]


@torch.no_grad()
def value_accuracy(drm: DRM, pairs: list[SiblingPairs], conditioning: Callable[[Tensor], tuple[Tensor, Tensor]],
                   ) -> dict[float, float]:
    """Per sibling sigma: how often the DRM orders the two states as the teacher orders their images (ties 1/2)."""
    was_training = drm.training
    drm.eval()
    out = {}
    for p in pairs:
        context, pooled = conditioning(p.rows)
        scores = drm.score(torch.cat([p.a, p.b]), p.sigma, torch.cat([context] * 2), torch.cat([pooled] * 2))
        diff = scores.view(2, -1)[0] - scores.view(2, -1)[1]
        agree = (diff > 0).float() * p.label + (diff < 0).float() * (1 - p.label) + 0.5 * (diff == 0).float()
        out[round(p.sigma, 4)] = float(agree.mean())
    drm.train(was_training)
    return out


def build_rollouts(cfg: ValueSection, prompts: PromptSection, teacher: str, texts: list[str] | None, out: Path,
                   seed: int, device: torch.device | str) -> ValueRollouts:
    """The generator (CFG with the encoded negative prompt), the teacher DRM and the prompt embeddings of a run;
    the first prompts.eval_prompts prompts are held out (at most half of them)."""
    from drm_core import load_drm, load_mmdit

    from .grpo_core import Policy
    from .grpo_inputs import check_embeddings, embeddings_path, prompt_embeddings

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    emb = prompt_embeddings(prompts, out, texts)
    _, _, backbone = read_backbone_config(cfg.generator)
    check_embeddings(emb, backbone, prompts.eval_prompts, embeddings_path(prompts, out))
    n_eval = min(prompts.eval_prompts, len(emb.context) // 2)
    transformer = load_mmdit(cfg.generator, dtype=dtype).to(device).eval().requires_grad_(False)
    policy = Policy(transformer, emb.context.to(device, dtype), emb.pooled.to(device, dtype), cfg.cfg_scale,
                    emb.negative_context.to(device, dtype), emb.negative_pooled.to(device, dtype))
    judge = load_drm(teacher, device=device, dtype=dtype).eval()
    log.info("value training: rollouts of %s (%d steps, CFG %g, noise level %g, %s completions), teacher %s, %d "
             "training / %d held-out prompts", cfg.generator, cfg.steps, cfg.cfg_scale, cfg.noise_level,
             cfg.completion, teacher, len(emb.context) - n_eval, n_eval)
    return ValueRollouts(cfg, policy.velocity, judge, policy.context, policy.pooled,
                         torch.arange(n_eval, len(emb.context)), torch.arange(n_eval), seed, device, dtype)
