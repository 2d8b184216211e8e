"""`python -m training import-rm`: turn a published latent reward model into a DRM file.

Kinds (see docs/import_rm.md for downloads and caveats):
- `dina-lrm`: DiNa-LRM (HKUST-C4G/diffusion-rm, weights `DiNa-LRM-SD35M-12layers`). The download
  holds a PEFT LoRA for the first 12 joint blocks (`checkpoint/backbone_lora/`), the reward head
  (`checkpoint/rm_head.pt`, a torch pickle) and `config.json`. The backbone comes from the user's
  SD3.5-M checkpoint (`--base`); the LoRA is merged into it (W += scale * B @ A, scale = alpha / r,
  or alpha / sqrt(r) with rsLoRA) and the head becomes a "dina-lrm" head.
- `drm-official`: the DRM paper's own layout (github jjaxonx/DRM): one `model.safetensors` with the
  whole SD3.5 MMDiT under `transformer.` (diffusers names, all blocks, the last 3 unused) and the
  conv head under `reward_output.` (down1..3 = conv/GroupNorm/ReLU, mlp.0/mlp.3 linear).

`rm_head.pt` is the only pickle the pack ever reads, here and only with `torch.load(weights_only=True)`;
a pickle that would run code is refused. Missing, extra and mis-shaped tensors are errors that name
them; tensors the published model itself never uses are listed in the log and the metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from drm_core import DRM, DRMError, drm_from_base, save_drm
from drm_core.checkpoint import TensorSource, check_state, read_backbone_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# DiNa-LRM-SD35M-12layers (config/sd3m/thurstone-12layer.yaml), used where the download has no config.json.
DINA_SD35M_DEFAULTS = {"num_transformer_layers": 12, "visual_head_idx": [4, 8, 12], "text_head_idx": [4, 8, 12],
                       "use_lora": True, "freeze_backbone": False, "use_logistic": False,
                       "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4,
                                       "num_attn_heads": 8, "dropout": 0.0}}
# SD3 text conditioning as diffusers' SD3 pipeline builds it: CLIP-L/G penultimate states (77 tokens each,
# concatenated and zero-padded to 4096) followed by T5 padded to t5_max_length without an attention mask.
SCHEME = "diffusers-sd3"
DINA_SIGMA_HINT = {"generated_latents": 0.4, "encoded_images": 0.1}
# Blocks the official code skips at the end ("layer_missing"): 3 of SD3.5-M's 24, 5 of SD3.5-L's 38.
OFFICIAL_LAYER_MISSING = {24: 3, 38: 5}
SCORE_NOTE = ("raw head output, no normalisation applied (a positive affine map changes neither rankings, "
              "step-wise selection nor group-normalised advantages)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="the downloaded model: DiNa-LRM snapshot folder (or its "
                        "checkpoint/ folder); official DRM model.safetensors (or the folder holding it)")
    parser.add_argument("--kind", required=True, choices=["dina-lrm", "drm-official"], help="published layout")
    parser.add_argument("--out", required=True, type=Path, help="DRM file to write (.safetensors)")
    parser.add_argument("--base", type=Path, help="SD3.5-M base checkpoint, any layout drm_from_base reads "
                        "(required for dina-lrm, whose download holds only a LoRA)")
    parser.add_argument("--config", type=Path, help="dina-lrm: its config.json (default: found in the download)")
    parser.add_argument("--blocks", type=int, help="drm-official: joint blocks the model runs (default: 21 for "
                        "SD3.5-M, 33 for SD3.5-L, as the official code)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written file (default: the weights')")


def run(args: argparse.Namespace) -> int:
    if args.out.suffix != ".safetensors":
        raise DRMError(f"--out {args.out}: a DRM file must end in .safetensors")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.kind == "dina-lrm":
        if args.base is None:
            raise DRMError("import-rm --kind dina-lrm needs --base: the SD3.5-M checkpoint the LoRA was trained on")
        drm = import_dina_lrm(args.source, args.base, config=args.config, dtype=dtype)
    else:
        drm = import_drm_official(args.source, blocks=args.blocks, dtype=dtype)
    path = save_drm(drm, args.out)
    log.info("wrote %s (%s head, %d blocks); put it in ComfyUI's models/drm/", path, drm.config.head.kind,
             drm.config.backbone.blocks)
    return 0


# ----------------------------------------------------------------------------------------------- DiNa-LRM

def import_dina_lrm(source: str | Path, base: str | Path, config: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> DRM:
    """DiNa-LRM download + SD3.5-M base -> DRM with a "dina-lrm" head and the LoRA merged in."""
    ckpt, config_file = _find_dina(Path(source), Path(config) if config else None)
    settings = _dina_settings(config_file)
    head_file = ckpt / "rm_head.pt"
    head_state = load_head_pickle(head_file)
    rh = settings["reward_head"]
    if int(rh.get("out_dim", 1)) != 1:
        raise DRMError(f"{config_file}: reward_head.out_dim {rh['out_dim']} is not 1 (a scalar reward)")
    width = int(rh.get("width", -1))
    head_options = dict(kind="dina-lrm", visual_taps=tuple(settings["visual_head_idx"]),
                        text_taps=tuple(settings["text_head_idx"]), width=None if width == -1 else width,
                        num_queries=int(rh.get("num_queries", 4)), attn_heads=int(rh.get("num_attn_heads", 8)),
                        proj_in=bool(rh.get("use_proj_in", False)), dropout=float(rh.get("dropout", 0.0)))
    blocks = int(settings["num_transformer_layers"])
    drm = drm_from_base(base, blocks=blocks, **head_options)
    out_dtype = dtype or next(drm.parameters()).dtype
    drm = drm.float()  # merge and load in float32, cast once at the end

    merged: dict = {"applied": False}
    lora_dir = ckpt / "backbone_lora"
    if settings.get("freeze_backbone") or not settings.get("use_lora", True):
        if lora_dir.exists():
            raise DRMError(f"{lora_dir}: config says the backbone was frozen / has no LoRA, yet a LoRA is present")
    else:
        merged = merge_peft_lora(drm, lora_dir, skip_prefixes=("head.",))

    _load_exact(drm.head, head_state, str(head_file), prefix="")
    drm = drm.to(out_dtype).eval()
    score = {"normalisation": "none", "note": SCORE_NOTE,
             "upstream": {"readme": "(raw + 10) / 10", "grpo_scorer": "raw / 5"}}
    if settings.get("use_logistic"):
        log.warning("%s enables a logistic output transform whose parameters are not in the published files; "
                    "it is not applied (it is monotone: rankings are unchanged)", config_file)
        score["upstream"]["logistic"] = "enabled in config, parameters unpublished, not applied"
    drm.provenance.update({
        "imported_from": {"kind": "dina-lrm", "source": str(Path(source).name), "head": "rm_head.pt",
                          "lora": merged, "config": config_file.name if config_file else "built-in defaults"},
        "upstream": "HKUST-C4G/diffusion-rm (DiNa-LRM)",
        "text_encoding": {"scheme": SCHEME, "t5_max_length": 256,
                          "note": "as DiNa-LRM's published scoring examples encode prompts; its training code "
                                  "(SD3RewardModel.encode_prompt) pads T5 to 128"},
        "score": score,
        "sigma": {"input": "sigma of the given latents, timestep = 1000 * sigma",
                  "upstream_grid": "DiNa-LRM snaps sigma to the nearest of 1000 shift-3 training sigmas",
                  "clean_latent_hint": DINA_SIGMA_HINT,
                  "clean_latent_noise": "noise clean latents to the hinted sigma with a seeded generator"},
    })
    log.info("imported DiNa-LRM: %d blocks, taps image %s text %s, LoRA on %d modules", blocks,
             head_options["visual_taps"], head_options["text_taps"], merged.get("modules", 0))
    return drm


def _find_dina(source: Path, config: Path | None) -> tuple[Path, Path | None]:
    """The folder holding rm_head.pt (+ backbone_lora/) and the config.json to read, if any."""
    if not source.is_dir():
        raise DRMError(f"{source}: expected the DiNa-LRM download folder (holding checkpoint/rm_head.pt)")
    candidates = [source, source / "checkpoint"]
    ckpt = next((d for d in candidates if (d / "rm_head.pt").is_file()), None)
    if ckpt is None:
        raise DRMError(f"{source}: no rm_head.pt in it or in {source / 'checkpoint'} (is this the "
                       "DiNa-LRM-SD35M-12layers download?)")
    if config is None:
        config = next((c for c in (ckpt / "config.json", ckpt.parent / "config.json", source / "config.json")
                       if c.is_file()), None)
    elif not config.is_file():
        raise DRMError(f"--config {config}: no such file")
    return ckpt, config


def _dina_settings(config_file: Path | None) -> dict:
    if config_file is None:
        log.warning("no DiNa-LRM config.json found: assuming DiNa-LRM-SD35M-12layers (12 blocks, taps 4/8/12)")
        return DINA_SD35M_DEFAULTS
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DRMError(f"{config_file}: not valid JSON ({err})") from err
    model = raw.get("model", raw)
    if not isinstance(model, dict):
        raise DRMError(f"{config_file}: no 'model' section")
    settings = {**DINA_SD35M_DEFAULTS, **model}
    settings["reward_head"] = {**DINA_SD35M_DEFAULTS["reward_head"], **(model.get("reward_head") or {})}
    return settings


def load_head_pickle(path: Path) -> dict[str, Tensor]:
    """Read a published head state dict (a torch pickle) with weights_only=True: tensors only, no code."""
    if not path.is_file():
        raise DRMError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise DRMError(f"{path}: refused: this pickle holds more than tensors and could run code when loaded "
                       f"({first}). Re-download it from the official source.") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise DRMError(f"{path}: not a readable torch state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise DRMError(f"{path}: expected a state dict of named tensors, got {type(state).__name__}")
    return state


# ------------------------------------------------------------------------------------------------ PEFT LoRA

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def merge_peft_lora(model: torch.nn.Module, lora_dir: Path, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Merge a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into `model` in place.

    PEFT module names (`base_model.model.<name>`) must be `model`'s own module names. Every LoRA pair
    must hit a Linear of the right shape, and every Linear PEFT's target/exclude rules select must have
    a pair: anything else is an error naming the modules. Returns a summary for the metadata.
    """
    cfg_file, weights = lora_dir / "adapter_config.json", lora_dir / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise DRMError(f"{lora_dir}: no adapter_config.json (expected a PEFT LoRA folder)")
    if not weights.is_file():
        pickled = lora_dir / "adapter_model.bin"
        hint = f" ({pickled.name} is a pickle; only safetensors adapters are read)" if pickled.exists() else ""
        raise DRMError(f"{lora_dir}: no adapter_model.safetensors{hint}")
    cfg = json.loads(cfg_file.read_text())
    unsupported = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": cfg.get("use_dora"),
                   "lora_bias": cfg.get("lora_bias"), "fan_in_fan_out": cfg.get("fan_in_fan_out"),
                   "layers_to_transform": cfg.get("layers_to_transform"),
                   "layer_replication": cfg.get("layer_replication"),
                   "bias": cfg.get("bias", "none") != "none"}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise DRMError(f"{cfg_file}: unsupported adapter settings {bad} (only plain LoRA can be merged)")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DRMError(f"{weights}: not a readable safetensors file ({err})") from err

    pairs: dict[str, dict[str, Tensor]] = {}
    unexpected = []
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            unexpected.append(key)
        else:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
    linears = {n: mod for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not n.startswith(skip_prefixes)}
    unknown = sorted(n for n in pairs if n not in linears)
    half = sorted(n for n, p in pairs.items() if set(p) != {"A", "B"})
    wanted = sorted(n for n in linears if _peft_targets(n, cfg))
    missing = sorted(set(wanted) - set(pairs))
    if unexpected or unknown or half or missing:
        raise DRMError(f"{weights}: LoRA does not match the {len(linears)} backbone Linear layers: unexpected keys "
                       f"{unexpected[:5]}, modules not in the backbone {unknown[:5]}, incomplete A/B pairs {half[:5]}, "
                       f"targeted modules without LoRA {missing[:5]}")
    wrong, ranks = [], set()
    with torch.no_grad():
        for name, p in sorted(pairs.items()):
            weight = linears[name].weight
            a, b = p["A"].float(), p["B"].float()
            r = a.shape[0]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != weight.shape[1] or b.shape != (weight.shape[0], r):
                wrong.append((name, tuple(a.shape), tuple(b.shape), tuple(weight.shape)))
                continue
            expected_r = int(_pattern_value(name, cfg.get("rank_pattern") or {}, cfg["r"]))
            if r != expected_r:
                wrong.append((name, f"rank {r}", f"config rank {expected_r}"))
                continue
            alpha = float(_pattern_value(name, cfg.get("alpha_pattern") or {}, cfg["lora_alpha"]))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            weight.add_((scale * (b @ a)).to(weight.dtype))  # [out, in]
            ranks.add((r, alpha))
    if wrong:
        raise DRMError(f"{weights}: LoRA shapes do not match the backbone: {wrong[:5]}")
    return {"applied": True, "modules": len(pairs), "rank_alpha": sorted(ranks), "rslora": bool(cfg.get("use_rslora")),
            "merged": "W += scale * B @ A in float32"}


def _peft_match(name: str, spec) -> bool:
    """PEFT's module selection: a string is a full regex match; a list matches a name or a dotted suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _peft_targets(name: str, cfg: dict) -> bool:
    return _peft_match(name, cfg.get("target_modules")) and not _peft_match(name, cfg.get("exclude_modules"))


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


# ------------------------------------------------------------------------------------------ official DRM

def import_drm_official(source: str | Path, blocks: int | None = None, dtype: torch.dtype | None = None) -> DRM:
    """The official DRM's model.safetensors (whole truncated MMDiT + conv head) -> DRM, tensors unchanged."""
    file = _find_official(Path(source))
    src = TensorSource(file)
    head_keys = {k for k in src.shapes if k.startswith("reward_output.")}
    if not head_keys or not any(k.startswith("transformer.") for k in src.shapes):
        raise DRMError(f"{file}: not an official DRM checkpoint (expected 'transformer.*' and 'reward_output.*' "
                       f"tensors, found e.g. {sorted(src.shapes)[:3]})")
    _, _, full = read_backbone_config(file, blocks=1)
    if blocks is None:
        if full.depth not in OFFICIAL_LAYER_MISSING:
            raise DRMError(f"{file}: MMDiT with {full.depth} blocks is neither SD3.5-M nor SD3.5-L; pass --blocks")
        blocks = full.depth - OFFICIAL_LAYER_MISSING[full.depth]
    convs = [src.shapes.get(f"reward_output.down{i}.0.weight") for i in (1, 2, 3)]
    if any(s is None for s in convs) or "reward_output.mlp.0.weight" not in src.shapes:
        raise DRMError(f"{file}: reward head tensors missing (expected reward_output.down1..3 and mlp.0/mlp.3, "
                       f"found {sorted(head_keys)[:8]})")
    head_options = dict(conv_channels=tuple(s[0] for s in convs), groups=32,
                        mlp_hidden=src.shapes["reward_output.mlp.0.weight"][0], dropout=0.1)
    drm = drm_from_base(file, blocks=blocks, dtype=dtype, **head_options)
    mapped = {}
    for key in head_keys:
        m = re.fullmatch(r"reward_output\.down([123])\.([01])\.(weight|bias)", key)
        if m:
            mapped[f"convs.{3 * (int(m[1]) - 1) + int(m[2])}.{m[3]}"] = key
        elif re.fullmatch(r"reward_output\.mlp\.[03]\.(weight|bias)", key):
            mapped[key[len("reward_output."):]] = key
        else:
            raise DRMError(f"{file}: unexpected head tensor '{key}' (official head: down1..3 conv/GroupNorm, mlp.0/3)")
    head_dtype = next(drm.head.parameters()).dtype
    _load_exact(drm.head, {ours: src.get(theirs).to(head_dtype) for ours, theirs in mapped.items()}, str(file),
                prefix="reward_output -> head.")
    used = set(_backbone_names(drm))
    ignored = sorted(k for k in src.shapes if k.startswith("transformer.") and k[len("transformer."):] not in used)
    stray = sorted(k for k in src.shapes if not k.startswith(("transformer.", "reward_output.")))
    if stray:
        raise DRMError(f"{file}: unexpected tensors {stray[:5]} (neither 'transformer.' nor 'reward_output.')")
    block_of = re.compile(r"transformer\.transformer_blocks\.(\d+)\.")
    unused_blocks = sorted({int(m[1]) for k in ignored if (m := block_of.match(k))})
    other = [k for k in ignored if not k.startswith("transformer.transformer_blocks.")]
    if other:
        raise DRMError(f"{file}: tensors the DRM does not know: {other[:5]}")
    log.info("official DRM: running blocks 0..%d; %d tensors of blocks %s are unused by the official model and "
             "not copied", blocks - 1, len(ignored), unused_blocks)
    drm.provenance.update({
        "imported_from": {"kind": "drm-official", "source": file.name, "unused_blocks_not_copied": unused_blocks},
        "upstream": "jjaxonx/DRM (official DRM code)",
        "text_encoding": {"scheme": SCHEME, "t5_max_length": 512,
                          "note": "the official training and inference default"},
        "score": {"normalisation": "none", "note": SCORE_NOTE},
    })
    return drm.eval()


def _find_official(source: Path) -> Path:
    if source.is_dir():
        source = source / "model.safetensors"
        if not source.is_file():
            raise DRMError(f"{source.parent}: no model.safetensors in it (the official trainer writes one per "
                           "checkpoint-N folder)")
    if source.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise DRMError(f"{source}: pickle weights are not read; use the model.safetensors the official trainer writes")
    return source


def _backbone_names(drm: DRM) -> list[str]:
    return [k for k in drm.state_dict() if not k.startswith("head.")]


def _load_exact(module: torch.nn.Module, state: dict[str, Tensor], name: str, prefix: str) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped tensor."""
    check_state(module, state, f"{name}: head tensors ({prefix or 'as named in the file'}) do not match the "
                               "architecture")
    dtype = next(module.parameters()).dtype
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
