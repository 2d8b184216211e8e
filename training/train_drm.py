"""`train-drm`: Bradley-Terry training of a DRM on cached preference pairs (DRM paper §3.1).

loss = -log sigmoid(r(x_w,sigma) - r(x_l,sigma)) with winner and loser noised to the same sigma.
All randomness (pair order, sigma, noise, dropout) is derived from (seed, step), so a resumed run
repeats an uninterrupted one and N processes see the same global batch as one. Before the model is
built, `check_inputs` proves `out` writable, reads the base's architecture from its header and checks
that the cache's latents and embeddings have the shapes that architecture takes.

With `value.generator` set the pairs are not read from a cache but made by the generator (training/value.py):
sibling states on its own trajectories, labelled by a teacher DRM's preference between the images they lead to.
`data.cache` is then optional and only evaluated on.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from drm_core import (DRM, BackboneConfig, DRMError, add_noise, drm_from_base, load_drm, read_backbone_config,
                      read_drm_header, save_drm, shift_sigma)
from drm_core.model import DRMConfig, HeadConfig

from .cache_format import PreferenceCache
from .checkpointing import check_writable, load_checkpoint, resolve_resume, save_checkpoint
from .config import load_config, save_resolved
from .evaluate import pairwise_accuracy
from .grpo_inputs import PromptSection, check_prompt_inputs
from .metrics import MetricLogger
from .value import ValueSection, build_rollouts, check_value_files, soft_bradley_terry_loss, value_accuracy

log = logging.getLogger(__name__)


@dataclass
class ModelSection:
    init: str = "base"  # base: SD3 weights | random: same architecture, random weights | drm: continue a DRM file
    base: str = ""  # SD3/SD3.5 checkpoint (any supported layout), or a DRM file for init = "drm"
    blocks: int | None = None  # None keeps all but the last 3 joint blocks (21 of 24 for SD3.5-M)
    conv_channels: tuple[int, ...] = (256, 512, 512)
    groups: int = 32
    mlp_hidden: int = 512
    dropout: float = 0.1
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    cache: str = ""  # preference cache folder from `python -m training cache`
    eval_cache: str = ""  # held-out cache; empty: hold out `eval_fraction` of the pairs
    eval_fraction: float = 0.05
    eval_limit: int = 2000  # pairs evaluated at each periodic eval
    in_memory: bool = False  # load all latents into RAM (small data sets)


@dataclass
class TrainSection:
    steps: int = 20000
    batch_size: int = 8  # pairs per optimizer step, across all processes
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    sigma_sampling: str = "logit_normal"  # logit_normal | uniform (over t, then SD3-shifted)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_shift: float = 3.0
    sigma_max: float = 1.0
    noise: str = "independent"  # independent | shared (winner and loser get the same noise)
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it) | bf16 | fp16 | no
    seed: int = 0
    eval_every: int = 1000
    eval_sigmas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    eval_noise_draws: int = 2
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10


@dataclass
class TrainDRMConfig:
    out: str = "runs/drm"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    value: ValueSection = field(default_factory=ValueSection)  # value training on a generator's rollouts
    prompts: PromptSection = field(default_factory=PromptSection)  # the rollouts' prompts (value training only)


@dataclass
class RunInputs:
    """What `check_inputs` found: pairs to train on (None: value rollouts), held-out pairs, the checkpoint to resume,
    and for value training the teacher's path and the prompt texts (None: prompts.cache as it is)."""

    data: PreferenceCache | None
    held_out: PreferenceCache | None
    checkpoint: Path | None
    teacher: str = ""
    texts: list[str] | None = None


def build_model(cfg: ModelSection, seed: int) -> DRM:
    """DRM initialised from the base checkpoint, randomly with the base's architecture, or from a DRM file."""
    torch.manual_seed(seed)  # same head init on every process
    head = dict(conv_channels=cfg.conv_channels, groups=cfg.groups, mlp_hidden=cfg.mlp_hidden, dropout=cfg.dropout)
    if not cfg.base:
        raise DRMError("model.base is empty: give an SD3/SD3.5 checkpoint (or a DRM file with model.init = \"drm\")")
    if cfg.init == "base":
        drm = drm_from_base(cfg.base, blocks=cfg.blocks, dtype=torch.float32, **head)
    elif cfg.init == "random":
        _, _, backbone = read_backbone_config(cfg.base, cfg.blocks)
        drm = DRM(DRMConfig(backbone, HeadConfig(**head)), {"base_model": f"random init ({Path(cfg.base).name} shape)"})
    elif cfg.init == "drm":
        drm = load_drm(cfg.base, dtype=torch.float32)
    else:
        raise DRMError(f"model.init must be base, random or drm, got {cfg.init!r}")
    drm.gradient_checkpointing = cfg.gradient_checkpointing
    return drm.float()


def base_backbone(cfg: ModelSection) -> BackboneConfig:
    """The backbone `build_model` will build, read from model.base's header alone (no weights)."""
    if not cfg.base:
        raise DRMError("model.base is empty: give an SD3/SD3.5 checkpoint (or a DRM file with model.init = \"drm\")")
    if cfg.init not in ("base", "random", "drm"):
        raise DRMError(f"model.init must be base, random or drm, got {cfg.init!r}")
    try:
        if cfg.init == "drm":
            return DRMConfig.from_dict(read_drm_header(cfg.base)).backbone
        return read_backbone_config(cfg.base, cfg.blocks)[2]
    except (DRMError, TypeError) as err:
        raise DRMError(f"model.base = {cfg.base}: {err}") from err


def check_cache_fits(data: PreferenceCache, backbone: BackboneConfig, where: str, base: str) -> None:
    """The cache's latents and text embeddings have the shapes the backbone takes (read from its first pair)."""
    if not len(data):
        raise DRMError(f"{where}: no pairs to train or evaluate on")
    item = data[0]
    channels, height, width = item["win"].shape
    patch, grid = backbone.patch_size, backbone.pos_embed_max_size
    problems = []
    if channels != backbone.in_channels:
        problems.append(f"latents have {channels} channels, the model takes {backbone.in_channels}")
    if height % patch or width % patch:
        problems.append(f"latents {height}x{width} are not multiples of the patch size {patch}")
    if max(height, width) > grid * patch:
        problems.append(f"latents {height}x{width} exceed the {grid * patch}x{grid * patch} its position "
                        f"embedding covers (images up to {grid * patch * 8} px)")
    if item["context"].shape[-1] != backbone.context_dim or item["pooled"].shape[-1] != backbone.pooled_dim:
        problems.append(f"text embeddings are {item['context'].shape[-1]} / {item['pooled'].shape[-1]} wide, the "
                        f"model takes context {backbone.context_dim} / pooled {backbone.pooled_dim}")
    if problems:
        raise DRMError(f"{where} does not fit model.base = {base}: " + "; ".join(problems))


def check_inputs(config: TrainDRMConfig, resume: str | None) -> RunInputs:
    """Everything a run reads or writes, checked before the model is built: out is writable, model.base's
    header, the cache(s) and their fit to the base, for value training the generator, teacher and prompts, and the
    checkpoint to resume."""
    out = check_writable(config.out, "out =")
    backbone = base_backbone(config.model)
    value = bool(config.value.generator)
    teacher, texts = "", None
    if value:
        teacher = check_value_files(config.value, backbone, config.model.base if config.model.init == "drm" else "")
        if not (config.prompts.file or config.prompts.cache):
            raise DRMError("value training needs prompts: set prompts.file (with prompts.text_encoders) or "
                           "prompts.cache (a folder with prompt_embeddings.safetensors, e.g. a train-grpo run's "
                           "out/prompts)")
        texts = check_prompt_inputs(config.prompts)
    elif not config.data.cache:
        raise DRMError("data.cache is empty: point it at a folder written by `python -m training cache` (or set "
                       "value.generator to train on a generator's rollouts)")
    data = held_out = None
    if not value:
        data, held_out = split_eval(PreferenceCache(config.data.cache, in_memory=config.data.in_memory),
                                    config.data, config.train.seed)
        check_cache_fits(data, backbone, f"data.cache = {config.data.cache}", config.model.base)
    elif config.data.eval_cache or config.data.cache:  # rollouts are the training data; these pairs are evaluated on
        cache = PreferenceCache(config.data.eval_cache or config.data.cache, in_memory=config.data.in_memory)
        held_out = cache.subset(torch.arange(min(len(cache), config.data.eval_limit)))
    if held_out is not None:
        if config.data.eval_cache:
            where = f"data.eval_cache = {config.data.eval_cache}"
        else:
            where = f"data.cache = {config.data.cache}" if value else "held-out pairs"
        check_cache_fits(held_out, backbone, where, config.model.base)
    return RunInputs(data, held_out, resolve_resume(out / "checkpoints", resume), teacher, texts)


def sample_sigmas(n: int, cfg: TrainSection, generator: torch.Generator) -> Tensor:
    """Per-pair sigma: t ~ logit-normal(m, s) or U(0, 1), then SD3 shift (official recipe: logit-normal, shift 3)."""
    if cfg.sigma_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator) * cfg.logit_std + cfg.logit_mean)
    elif cfg.sigma_sampling == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        raise DRMError(f"train.sigma_sampling must be logit_normal or uniform, got {cfg.sigma_sampling!r}")
    return (shift_sigma(t, cfg.sigma_shift).float() * cfg.sigma_max).clamp(0, 1)


def bradley_terry_loss(score_win: Tensor, score_lose: Tensor) -> Tensor:
    """-log sigmoid(s_w - s_l), averaged (DRM eq. 3)."""
    return -F.logsigmoid(score_win - score_lose).mean()


def global_batch(step: int, micro: int, n_pairs: int, cfg: TrainSection) -> Tensor:
    """Pair indices of one micro-batch of the global batch: epoch-wise permutations seeded by (seed, epoch)."""
    per_micro = cfg.batch_size // cfg.grad_accum
    start = (step * cfg.grad_accum + micro) * per_micro
    epoch, offset = divmod(start, n_pairs)
    perm = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    idx = perm[offset: offset + per_micro]
    if len(idx) < per_micro:  # wrap into the next epoch
        nxt = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch + 1))
        idx = torch.cat([idx, nxt[: per_micro - len(idx)]])
    return idx


def cache_pairs(data: PreferenceCache, step: int, micro: int, cfg: TrainSection, local: slice,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This process's rows of one micro-batch of cached pairs: winners then losers noised to one sigma per pair,
    x [2n, C, H, W], sigma [2n], context [n, N, D], pooled [n, P]."""
    per_micro = cfg.batch_size // cfg.grad_accum
    idx = global_batch(step, micro, len(data), cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)
    sigma = sample_sigmas(per_micro, cfg, gen)  # [G]
    batch = collate([data[int(i)] for i in idx.tolist()])
    noise_w = torch.randn(batch["win"].shape, generator=gen)
    noise_l = noise_w if cfg.noise == "shared" else torch.randn(batch["lose"].shape, generator=gen)
    x = torch.cat([add_noise(batch["win"][local], noise_w[local], sigma[local]),
                   add_noise(batch["lose"][local], noise_l[local], sigma[local])])
    return x, torch.cat([sigma[local]] * 2), batch["context"][local], batch["pooled"][local]


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def split_eval(data: PreferenceCache, cfg: DataSection, seed: int) -> tuple[PreferenceCache, PreferenceCache | None]:
    if cfg.eval_cache:
        held = PreferenceCache(cfg.eval_cache, in_memory=cfg.in_memory)
        return data, held.subset(torch.arange(min(len(held), cfg.eval_limit)))
    n_eval = int(len(data) * cfg.eval_fraction)
    if n_eval == 0:
        return data, None
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7))
    return data.subset(perm[n_eval:]), data.subset(perm[:min(n_eval, cfg.eval_limit)])


def train(config: TrainDRMConfig, resume: str | None = None, stop_after: int | None = None) -> Path:
    """Train and write out/drm.safetensors; `stop_after` ends early (to simulate a kill in tests)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg = config.train
    if cfg.batch_size % cfg.grad_accum:
        raise DRMError(f"train.batch_size {cfg.batch_size} must be divisible by train.grad_accum {cfg.grad_accum}")
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    per_micro = cfg.batch_size // cfg.grad_accum
    if per_micro % world:
        raise DRMError(f"pairs per micro-batch ({per_micro}) must be divisible by the {world} processes")
    out = Path(config.out)
    inputs = check_inputs(config, resume)
    data, held_out, ckpt = inputs.data, inputs.held_out, inputs.checkpoint
    model = build_model(config.model, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    start_step, best = 0, {}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start_step, best = state["step"], state.get("eval", {})
        log.info("resumed from %s at step %d", ckpt, start_step)
    if accelerator.is_main_process:
        save_resolved(config, out)
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics = MetricLogger(out, enabled=accelerator.is_main_process, truncate_after=start_step)
    rollouts, held_pairs = None, []
    if data is None:
        with accelerator.main_process_first():  # one process encodes the prompts (if needed), the others read them
            rollouts = build_rollouts(config.value, config.prompts, inputs.teacher, inputs.texts, out, cfg.seed,
                                      accelerator.device)
        held_pairs = rollouts.held_out()
        text_scheme = {"scheme": "comfyui-sd3", "value_generator": config.value.generator, "teacher": inputs.teacher}
    else:
        text_scheme = data.meta.get("text", {})
    last_eval = best

    def evaluate(done: int) -> None:
        """Held-out pairwise accuracy per sigma (cached pairs) and agreement with the teacher (value pairs)."""
        nonlocal last_eval
        last_eval, logged = {}, {}
        drm = accelerator.unwrap_model(model)
        if held_out is not None:
            acc = pairwise_accuracy(drm, held_out, cfg.eval_sigmas, cfg.eval_noise_draws, device=accelerator.device)
            last_eval.update({str(k): v for k, v in acc.items()})
            logged.update({f"eval/acc_sigma_{k}": v for k, v in acc.items()})
        if held_pairs:
            acc = value_accuracy(drm, held_pairs, rollouts.conditioning)
            last_eval.update({"value": sum(acc.values()) / len(acc), **{f"value_{k}": v for k, v in acc.items()}})
            logged.update({"eval/value_acc": last_eval["value"],
                           **{f"eval/value_acc_sigma_{k}": v for k, v in acc.items()}})
        metrics.log(done, logged)

    if rollouts is not None and start_step == 0 and (held_out is not None or held_pairs):
        evaluate(0)  # the DRM value training starts from, for comparison
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not accelerator.is_main_process, desc="train-drm")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start_step, end):
        model.train()
        torch.manual_seed(cfg.seed * 7919 + step * world + rank)  # dropout
        total = 0.0
        for micro in range(cfg.grad_accum):
            local = slice(rank * per_micro // world, (rank + 1) * per_micro // world)
            if rollouts is None:
                x, sigma, context, pooled = cache_pairs(data, step, micro, cfg, local)
                label = None
            else:
                pairs = rollouts.pairs(step, micro, per_micro, local)
                context, pooled = rollouts.conditioning(pairs.rows)
                x, label = torch.cat([pairs.a, pairs.b]), pairs.label  # [2n, C, H, W], [n]
                sigma = torch.full((x.shape[0],), pairs.sigma)
            n = x.shape[0] // 2
            device = accelerator.device
            with accelerator.autocast():
                scores = model(x.to(device), sigma.to(device), torch.cat([context] * 2).to(device),
                               torch.cat([pooled] * 2).to(device))
                loss = (bradley_terry_loss(scores[:n], scores[n:]) if label is None else
                        soft_bradley_terry_loss(scores[:n], scores[n:], label.to(device))) / cfg.grad_accum
            if micro < cfg.grad_accum - 1:
                with accelerator.no_sync(model):
                    accelerator.backward(loss)
            else:
                accelerator.backward(loss)
            total += loss.detach().float()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == end:
            mean_loss = accelerator.reduce(total.to(accelerator.device), "mean").item()
            metrics.log(done, {"loss": mean_loss, "grad_norm": float(grad_norm), "lr": cfg.lr})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if (held_out is not None or held_pairs) and (done % cfg.eval_every == 0 or done == cfg.steps):
            evaluate(done)
        if done % cfg.checkpoint_every == 0 or done == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out / "checkpoints", done, accelerator.unwrap_model(model), optimizer,
                                {"eval": last_eval, "processes": world}, cfg.keep_checkpoints)
    bar.close()
    metrics.close()
    final = out / "drm.safetensors"
    if end == cfg.steps and accelerator.is_main_process:
        drm = accelerator.unwrap_model(model)
        save_drm(drm, final, {"trained_steps": cfg.steps,
                              "train_data": config.data.cache if rollouts is None else "value rollouts",
                              "text_encoding": text_scheme, "init": config.model.init,
                              "eval_accuracy": last_eval, "processes": world, "config": asdict(config)})
        log.info("wrote %s", final)
    accelerator.wait_for_everyone()
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML config (see training/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.lr=2e-5 (repeatable)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    config = load_config(TrainDRMConfig, args.config, args.overrides)
    train(config, resume=args.resume)
    return 0
