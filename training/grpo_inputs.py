"""train-grpo's inputs: checked before anything is built, and the prompt embeddings (with the CFG negative).

`check_inputs` opens every file the run needs (base checkpoint layout, DRM headers, prompt file, text
encoders, VAE, output folder) and raises a `DRMError` naming the config key and the path, so a wrong
path fails in seconds instead of after the models are loaded. `prompt_embeddings` reads the run's
prompt cache and (re-)encodes, once, whatever is missing or stale: the prompts and the negative prompt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from drm_core import BackboneConfig, DRMError, flow_sigmas, read_backbone_config, read_drm_header
from drm_core.checkpoint import atomic_save_file

from .checkpointing import check_writable
from .sd3_files import open_text_encoders, open_vae

if TYPE_CHECKING:
    from .train_grpo import TrainGRPOConfig

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "prompt_embeddings.safetensors"


@dataclass
class PromptSection:
    file: str = ""  # one prompt per line (.txt) or {"prompt": ...} per line (.jsonl)
    text_encoders: str = ""  # ComfyUI's models/text_encoders or a diffusers SD3 folder; encoded once as ComfyUI does
    cache: str = ""  # or: a folder with prompt embeddings already encoded (written by a previous run)
    negative: str = "blurry, low quality, deformed"  # CFG negative prompt, as in the shipped workflows
    eval_prompts: int = 16  # held out from training, used for monitoring


@dataclass
class PromptEmbeddings:
    """Encoded prompts [M, N, 4096] / [M, 2048], the CFG negative [1, N, 4096] / [1, 2048], the texts if known."""

    context: Tensor
    pooled: Tensor
    negative_context: Tensor
    negative_pooled: Tensor
    texts: list[str] | None = None


@dataclass
class CheckedInputs:
    """What `check_inputs` found: the policy architecture, the prompts, and where the VAE comes from."""

    backbone: BackboneConfig
    prompts: list[str] | None  # from prompts.file (None: the cache is used as it is)
    vae: Path | None  # None: no validation images
    vae_note: str  # why images are off (or where the VAE comes from)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl ({"prompt": ...} per line); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise DRMError(f"prompts.file = {path}: no such file")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DRMError(f"{path}:{i}: expected a JSON object with a 'prompt' key ({err})") from err
        else:
            prompts.append(line.strip())
    if not prompts:
        raise DRMError(f"prompts.file = {path}: no prompts")
    return prompts


# ----------------------------------------------------------------------------- checks before the long pass

def keyed(key: str, path: str | Path, err: Exception) -> DRMError:
    """`err` as a DRMError that starts with the config key and its value (the path said once)."""
    message = str(err)
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        message = message.removeprefix(prefix)
    return DRMError(f"{key} = {path}: {message}")


def check_inputs(config: TrainGRPOConfig) -> CheckedInputs:
    """Open and validate every input of a train-grpo run without building a model; errors name key and path."""
    cfg, policy, reward, prompts = config.grpo, config.policy, config.reward, config.prompts
    if cfg.mode not in ("step", "terminal"):
        raise DRMError(f"grpo.mode must be step or terminal, got {cfg.mode!r}")
    if cfg.continue_with not in ("random", "argmax"):
        raise DRMError(f"grpo.continue_with must be random or argmax, got {cfg.continue_with!r}")
    if cfg.resolution < 16 or cfg.resolution % 16:
        raise DRMError(f"grpo.resolution must be a positive multiple of 16, got {cfg.resolution}")
    if cfg.eval_images < 0 or cfg.eval_noise_level < 0:
        raise DRMError("grpo.eval_images and grpo.eval_noise_level must be >= 0")
    if not 0.0 < cfg.train_sigma_max <= 1.0:
        raise DRMError(f"grpo.train_sigma_max must be in (0, 1] (1 trains every step), got {cfg.train_sigma_max}")
    trained = [s for s in flow_sigmas(cfg.steps)[:-2].tolist() if s <= cfg.train_sigma_max]  # last step: x0
    if cfg.mode == "step" and not trained:
        raise DRMError(f"grpo.train_sigma_max = {cfg.train_sigma_max} leaves no step to train in the {cfg.steps}-step "
                       f"schedule (sigmas {', '.join(f'{s:.3f}' for s in flow_sigmas(cfg.steps).tolist())}; the "
                       "last step is never scored): raise it or grpo.steps")
    if cfg.guard_tolerance < 0 or cfg.guard_contrast < 1:
        raise DRMError(f"grpo.guard_tolerance must be >= 0 (0: no guard) and grpo.guard_contrast >= 1, got "
                       f"{cfg.guard_tolerance} / {cfg.guard_contrast}")
    if cfg.guard_tolerance > 0 and config.prompts.eval_prompts < 2:
        raise DRMError(f"the prompt-alignment guard contrasts held-out prompts with each other: set "
                       f"prompts.eval_prompts >= 2 (got {config.prompts.eval_prompts}) or grpo.guard_tolerance = 0")
    for key, value in (("policy.base", policy.base), ("reward.drm", reward.drm)):
        if not value:
            raise DRMError(f"{key} is required (see training/configs/grpo_sd35m_512.toml)")
    backbone = _check_base(policy.base, cfg.resolution)
    check_drm_file("reward.drm", reward.drm, backbone, cfg.resolution)
    if reward.holdout_drm:
        check_drm_file("reward.holdout_drm", reward.holdout_drm, backbone, cfg.resolution)
    texts = check_prompt_inputs(prompts)
    vae, note = _resolve_vae(policy.vae, policy.base, cfg.eval_images)
    check_writable(config.out, "out =")
    return CheckedInputs(backbone, texts, vae, note)


def check_prompt_inputs(prompts: PromptSection) -> list[str] | None:
    """prompts.file (read and counted), prompts.text_encoders (opened, no weight read), prompts.cache (exists);
    returns the file's prompts (None without a file)."""
    texts = None
    if prompts.file:
        texts = read_prompt_file(prompts.file)
        check_prompt_count(len(texts), prompts.eval_prompts, f"prompts.file = {prompts.file}")
    if prompts.text_encoders:
        try:
            open_text_encoders(prompts.text_encoders)  # files, architectures and tokenizers; no weight read
        except DRMError as err:
            raise keyed("prompts.text_encoders", prompts.text_encoders, err) from err
    if prompts.cache and not Path(prompts.cache).is_dir():
        raise DRMError(f"prompts.cache = {prompts.cache}: no such folder (expected a folder with {EMBEDDINGS_FILE})")
    return texts


def check_prompt_count(count: int, eval_prompts: int, where: str) -> None:
    """At least one training prompt besides the `eval_prompts` held-out ones."""
    if count < eval_prompts + 1:
        raise DRMError(f"{where}: {count} prompt(s); need at least prompts.eval_prompts + 1 = {eval_prompts + 1} "
                       "(held-out prompts plus at least one training prompt)")


def _check_base(path: str, resolution: int) -> BackboneConfig:
    """The policy's MMDiT architecture from the checkpoint's tensor names and shapes (no weights read)."""
    try:
        _, _, backbone = read_backbone_config(path)
    except DRMError as err:
        raise keyed("policy.base", path, err) from err
    _check_resolution("policy.base", path, backbone, resolution)
    return backbone


def check_drm_file(key: str, path: str, policy: BackboneConfig, resolution: int, policy_key: str = "policy.base",
                   ) -> None:
    """The DRM file's header is valid and its backbone reads the policy's latents and conditioning."""
    try:
        header = read_drm_header(path)
        drm = BackboneConfig(**header["backbone"])
    except (DRMError, TypeError) as err:
        raise keyed(key, path, err) from err
    channels = header.get("latent", {}).get("channels", drm.in_channels)
    theirs = {"context_dim": drm.context_dim, "pooled_dim": drm.pooled_dim, "latent channels": channels,
              "kind": drm.kind}
    ours = {"context_dim": policy.context_dim, "pooled_dim": policy.pooled_dim, "latent channels": policy.in_channels,
            "kind": policy.kind}
    wrong = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if wrong:
        detail = ", ".join(f"{k} {a} ({policy_key}: {b})" for k, (a, b) in wrong.items())
        raise DRMError(f"{key} = {path}: this DRM was not built for the policy's architecture family: {detail}")
    _check_resolution(key, path, drm, resolution)


def _check_resolution(key: str, path: str, backbone: BackboneConfig, resolution: int) -> None:
    side = resolution // 8 // backbone.patch_size
    if side > backbone.pos_embed_max_size:
        raise DRMError(f"{key} = {path}: grpo.resolution {resolution} needs {side} patches per side; this model "
                       f"has positions for {backbone.pos_embed_max_size} "
                       f"(at most {backbone.pos_embed_max_size * backbone.patch_size * 8} px)")


def _resolve_vae(vae: str, base: str, eval_images: int) -> tuple[Path | None, str]:
    """policy.vae if set (checked), else the VAE inside a single-file policy.base, else none (and why)."""
    if eval_images == 0:
        return None, "grpo.eval_images = 0"
    if vae:
        try:
            open_vae(vae)  # layout and shapes; no weight read
        except DRMError as err:
            raise keyed("policy.vae", vae, err) from err
        return Path(vae), f"policy.vae = {vae}"
    if not Path(base).is_file():
        return None, (f"policy.vae is not set and policy.base = {base} is not a single-file checkpoint with a VAE; "
                      "set policy.vae to ComfyUI's models/vae/ file or a diffusers VAE folder to get sample grids")
    try:
        open_vae(base)
    except DRMError as err:
        return None, f"policy.vae is not set and policy.base has no usable VAE ({err})"
    return Path(base), f"the VAE inside policy.base = {base}"


# ----------------------------------------------------------------------------- prompt embeddings

def embeddings_path(cfg: PromptSection, out: Path) -> Path:
    """prompts.cache/prompt_embeddings.safetensors, else out/prompts/prompt_embeddings.safetensors."""
    return (Path(cfg.cache) if cfg.cache else out / "prompts") / EMBEDDINGS_FILE


def prompt_embeddings(cfg: PromptSection, out: Path, texts: list[str] | None = None) -> PromptEmbeddings:
    """The prompt cache (`embeddings_path`): encoded once with prompts.text_encoders, ComfyUI's way; re-encoded
    (in place) when its prompts differ from `texts` (prompts.file) or its negative from prompts.negative."""
    path = embeddings_path(cfg, out)
    tensors, meta = _read_cache(path) if path.is_file() else ({}, {})
    stored_texts = json.loads(meta["prompts"]) if "prompts" in meta else None
    stale_prompts = not tensors or (texts is not None and stored_texts is not None and stored_texts != texts)
    stale_negative = "negative_context" not in tensors or meta.get("negative") != cfg.negative
    if stale_prompts or stale_negative:
        if not cfg.text_encoders:
            raise DRMError(_stale_message(path, tensors, stored_texts, texts, meta.get("negative"), cfg.negative))
        encoder = _load_text_encoder(cfg.text_encoders)
        if stale_prompts:
            texts = texts if texts is not None else stored_texts
            if texts is None:
                raise DRMError(f"{path}: no prompt embeddings and no prompts.file to encode them from")
            parts = [encoder.encode(texts[i:i + 16]) for i in range(0, len(texts), 16)]
            tensors["context"] = torch.cat([p[0] for p in parts]).contiguous()  # [M, N, 4096]
            tensors["pooled"] = torch.cat([p[1] for p in parts]).contiguous()  # [M, 2048]
            meta.update(prompts=json.dumps(texts), scheme="comfyui-sd3")
        negative_context, negative_pooled = encoder.encode([cfg.negative])  # [1, N, 4096], [1, 2048]
        del encoder  # no text encoder stays in memory while training
        tensors.update(negative_context=negative_context.contiguous(), negative_pooled=negative_pooled.contiguous())
        meta["negative"] = cfg.negative
        atomic_save_file(tensors, path, meta)
        log.info("encoded %s with negative prompt %r into %s", "prompts" if stale_prompts else "the negative",
                 cfg.negative, path)
    return PromptEmbeddings(tensors["context"].float(), tensors["pooled"].float(),
                            tensors["negative_context"].float(), tensors["negative_pooled"].float(),
                            json.loads(meta["prompts"]) if "prompts" in meta else None)


def _read_cache(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise DRMError(f"{path}: not a readable prompt-embeddings file ({err}); delete it to re-encode") from err


def _stale_message(path: Path, tensors: dict, stored_texts: list[str] | None, texts: list[str] | None,
                   stored_negative: str | None, negative: str) -> str:
    if not tensors:
        return f"no prompt embeddings at {path}: set prompts.file and prompts.text_encoders to encode them"
    if texts is not None and stored_texts is not None and stored_texts != texts:
        return (f"{path}: encoded from other prompts than prompts.file; set prompts.text_encoders to re-encode "
                "them, or use another out / prompts.cache")
    made = "no negative prompt (zeroed conditioning)" if stored_negative is None else f"negative {stored_negative!r}"
    return (f"{path}: made with {made}, but prompts.negative = {negative!r}; set prompts.text_encoders to "
            f"re-encode the negative" + ("" if stored_negative is None else f", or set prompts.negative = "
                                         f"{json.dumps(stored_negative)}"))


def _load_text_encoder(path: str):
    from .encoders import SD3TextEncoder

    try:
        return SD3TextEncoder.from_pretrained(path)
    except DRMError as err:
        raise keyed("prompts.text_encoders", path, err) from err


def check_embeddings(emb: PromptEmbeddings, backbone: BackboneConfig, eval_prompts: int, where: Path) -> None:
    """Embedding widths match the policy and there is at least one training prompt besides the held-out ones."""
    if emb.context.shape[-1] != backbone.context_dim or emb.pooled.shape[-1] != backbone.pooled_dim:
        raise DRMError(f"{where}: prompt embeddings are {emb.context.shape[-1]} / {emb.pooled.shape[-1]} wide; "
                       f"policy.base expects context {backbone.context_dim} / pooled {backbone.pooled_dim}")
    if emb.negative_context.shape[1:] != emb.context.shape[1:] or emb.negative_pooled.shape[1:] != emb.pooled.shape[1:]:
        raise DRMError(f"{where}: the negative prompt's embeddings {list(emb.negative_context.shape)} do not match the "
                       f"prompts' {list(emb.context.shape)}; delete the file to re-encode both")
    check_prompt_count(len(emb.context), eval_prompts, str(where))
