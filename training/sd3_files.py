"""Open SD3 component files (VAE, CLIP-L, CLIP-G, T5-XXL, tokenizers) in the layouts users have.

Layouts, with the facts taken from ComfyUI 0.3.64:
* A single-file checkpoint (e.g. `sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors`): the VAE under
  `first_stage_model.` with LDM names (comfy/supported_models_base.py `vae_key_prefix`), the text encoders
  under `text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.` and
  `text_encoders.t5xxl.transformer.` (comfy/supported_models.py, class SD3: `text_encoder_key_prefix`,
  `clip_target`) with transformers' names below those prefixes.
* ComfyUI's `models/text_encoders/`: CLIP-L and CLIP-G in transformers' `CLIPTextModelWithProjection` names
  (`text_model.*`, `text_projection.weight`; old files hold a transposed `text_projection`, comfy/sd.py),
  T5-XXL in `T5EncoderModel` names (`encoder.*`, `shared.weight`; `encoder.embed_tokens` is tied to `shared`).
  fp8 files hold float8_e4m3fn weights (cast to the compute dtype). Scaled-fp8 files add a float32
  `<layer>.scale_weight` per Linear layer and a `scaled_fp8` marker; the layer's weight is
  `weight * scale_weight` (comfy/ops.py `scaled_fp8_ops`); a `scale_input` only matters for fp8 matmuls,
  which ComfyUI's text encoders do not use (comfy/sd1_clip.py), so it is ignored here too.
* `models/vae/*.safetensors`: LDM names (`encoder.down.0.block.0.conv1.weight`) or diffusers names.
* diffusers: a pipeline folder (vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/) or a VAE folder.
Architectures come from tensor shapes (head dim 64 in CLIP; T5 heads from its relative attention bias).
Every file is opened lazily: headers first (layout, architecture and every tensor's name and shape are
checked before any weight is read), then one tensor at a time. Only .safetensors files are read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from drm_core import DRMError
from drm_core.latents import SD3_LATENT_CHANNELS, SD3_LATENT_SCALE, SD3_LATENT_SHIFT

log = logging.getLogger(__name__)

CONTEXT_DIM = 4096  # SD3 conditioning: T5-XXL width, CLIP-L+G zero-padded to it
POOLED_DIM = 2048  # CLIP-L hidden (unprojected) + CLIP-G projection
CLIP_HEAD_DIM = 64  # CLIP-L 768 / 12 heads, CLIP-G 1280 / 20 heads
ROLES = ("clip_l", "clip_g", "t5xxl")
ROLE_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
KNOWN_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # ComfyUI's sd1_clip_config.json / clip_config_bigg.json
DIFFUSERS_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
DIFFUSERS_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
COMFY_CLIP_TOKENIZER = Path("comfy", "sd1_tokenizer")
COMFY_T5_TOKENIZER = Path("comfy", "text_encoders", "t5_tokenizer")
CLIP_PROBE = "text_model.final_layer_norm.weight"
T5_PROBE = "encoder.final_layer_norm.weight"
LDM_VAE_PROBE = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_VAE_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"
T5_TIED = "encoder.embed_tokens.weight"
# tensors in ComfyUI's files that are no model parameter: fp8 bookkeeping, CLIP's logit scale and position ids
NOT_PARAMETERS = ("scaled_fp8", "logit_scale", "text_model.embeddings.position_ids")
NOT_PARAMETER_SUFFIXES = (".scale_weight", ".scale_input")
FP8 = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
PRECISION = {"F64": (6, "float64"), "F32": (5, "float32"), "F16": (4, "float16"), "BF16": (3, "bfloat16")}
LOCAL = "Weights must be local (this tool never downloads from a hub)"


# ----------------------------------------------------------------------------- safetensors files

@dataclass(frozen=True)
class SafetensorsFile:
    """The header of one .safetensors file: tensor names, shapes and dtypes (no weight read)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def open(cls, path: Path) -> "SafetensorsFile":
        """Read the header; refuses other file types by name and unreadable files naming the file."""
        if path.suffix != ".safetensors":
            raise DRMError(f"{path}: only .safetensors files are read (pickle formats such as '{path.suffix}' can run "
                           "code when loaded); convert it to safetensors first")
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                return cls(path, {k: tuple(s.get_shape()) for k, s in slices.items()},
                           {k: s.get_dtype() for k, s in slices.items()})
        except (SafetensorError, OSError) as err:
            raise DRMError(f"{path}: not a readable safetensors file ({err}); is it truncated or corrupt?") from err

    def prefixes(self, probe: str) -> list[str]:
        """Key prefixes in front of `probe`, shortest first."""
        return sorted({k[: -len(probe)] for k in self.shapes if k.endswith(probe)}, key=len)

    def under(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors below `prefix`, keyed without it."""
        return {k[len(prefix):]: v for k, v in self.shapes.items() if k.startswith(prefix)}

    def contents(self) -> str:
        """What the file holds, for error messages."""
        parts = [what for probe, what in (("joint_blocks.0.context_block.attn.qkv.weight", "an MMDiT"),
                                          ("transformer_blocks.0.attn.add_q_proj.weight", "an MMDiT"),
                                          (LDM_VAE_PROBE, "a VAE"), (DIFFUSERS_VAE_PROBE, "a VAE"),
                                          (CLIP_PROBE, "a CLIP text model"), (T5_PROBE, "a T5 encoder"))
                 if self.prefixes(probe)]
        return f"{len(self.shapes)} tensors: " + (", ".join(dict.fromkeys(parts)) if parts else
                                                  f"none of SD3's parts, e.g. {list(self.shapes)[:3]}")


def read_weight(f: Any, file: SafetensorsFile, key: str) -> Tensor:
    """One tensor; fp8 is cast up, and a scaled-fp8 weight is multiplied by its `scale_weight` in float32."""
    tensor = f.get_tensor(key)
    scale = key.removesuffix(".weight") + ".scale_weight"
    if key.endswith(".weight") and scale in file.shapes:
        return tensor.float() * f.get_tensor(scale).float()
    return tensor.float() if file.dtypes[key] in FP8 else tensor


def _squeezed(shape: Sequence[int]) -> list[int]:
    return [d for d in shape if d != 1]


@dataclass(frozen=True)
class WeightPlan:
    """One model's weights inside one file: each state-dict entry's source key and expected shape."""

    file: SafetensorsFile
    name: str  # e.g. "CLIP-L"
    sources: dict[str, str]  # model key -> file key ("" = identity matrix: CLIP-L's unused projection)
    shapes: dict[str, tuple[int, ...]]  # model key -> the shape the model expects
    transposed: frozenset[str] = frozenset()

    def check(self, prefix: str, ignored: Iterable[str] = ()) -> "WeightPlan":
        """0 missing, 0 unexpected, every shape right (1x1 convolutions may stand for linear weights)."""
        missing, wrong = [], []
        for key, source in self.sources.items():
            if not source:
                continue
            if source not in self.file.shapes:
                missing.append(source)
                continue
            have = self.file.shapes[source][::-1] if key in self.transposed else self.file.shapes[source]
            if _squeezed(have) != _squeezed(self.shapes[key]):
                wrong.append(f"{source} {list(have)} (model expects {list(self.shapes[key])})")
        used = set(self.sources.values()) | {prefix + k for k in ignored}
        unexpected = [k for k in self.file.shapes if k.startswith(prefix) and k not in used
                      and k[len(prefix):] not in NOT_PARAMETERS and not k.endswith(NOT_PARAMETER_SUFFIXES)]
        if missing or wrong or unexpected:
            where = f" under '{prefix}'" if prefix else ""
            raise DRMError(f"{self.file.path}: the {self.name}{where} does not match the architecture its shapes "
                           f"imply: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]} "
                           "(truncated, partial or not an SD3 file?)")
        return self

    def read(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The model's state dict in `dtype`, read and converted one tensor at a time."""
        state = {}
        with safe_open(str(self.file.path), framework="pt") as f:
            for key, source in self.sources.items():
                if not source:
                    state[key] = torch.eye(*self.shapes[key], dtype=dtype)
                    continue
                tensor = read_weight(f, self.file, source)
                if key in self.transposed:
                    tensor = tensor.T
                state[key] = tensor.reshape(self.shapes[key]).to(dtype, copy=True).contiguous()
        return state


def _meta_shapes(make: Any) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = make()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _local_path(path: str | Path, what: str, expected: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DRMError(f"{what} {path}: no such local file or folder. {LOCAL}: pass {expected}")
    return p


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _max_index(shapes: Iterable[str], pattern: str) -> int:
    """1 + the largest integer captured by `pattern` in the keys (0 if none)."""
    found = [int(m.group(1)) for k in shapes if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


# ----------------------------------------------------------------------------- VAE

VAE_EXPECTED = ("a single-file SD3/SD3.5 checkpoint (first_stage_model.*), a VAE .safetensors (ComfyUI models/vae/, "
                "LDM or diffusers names), a diffusers VAE folder (config.json) or an SD3 pipeline folder with vae/")


VAE_NAMES = {  # per naming scheme: down blocks, resnets of block 0, a block's output conv, the mid attention
    "ldm": (r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.", "encoder.down.{}.block.0.conv2.weight",
            "encoder.mid.attn_1.q.weight"),
    "diffusers": (r"encoder\.down_blocks\.(\d+)\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.",
                  "encoder.down_blocks.{}.resnets.0.conv2.weight", "encoder.mid_block.attentions.0.to_q.weight"),
}


def sd3_vae_config(shapes: dict[str, tuple[int, ...]], names: str) -> dict:
    """diffusers AutoencoderKL config of an SD3-style VAE from its tensor shapes ("ldm" or "diffusers" names).

    Block channels, layers per block, latent channels, quant convs and the mid attention come from the
    shapes; the 32 norm groups and the latent shift/scale are SD3's (shapes do not show them)."""
    blocks, resnets, block, mid = VAE_NAMES[names]
    n = _max_index(shapes, blocks)
    needed = [block.format(i) for i in range(n)] + ["encoder.conv_in.weight", "encoder.conv_out.weight",
                                                    "decoder.conv_out.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise DRMError(f"VAE tensors {absent[:3]} are missing")
    return dict(in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(shapes[block.format(i)][0] for i in range(n)),
                layers_per_block=_max_index(shapes, resnets), latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
                norm_num_groups=32, sample_size=1024, scaling_factor=SD3_LATENT_SCALE, shift_factor=SD3_LATENT_SHIFT,
                use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
                mid_block_add_attention=mid in shapes)


class _KeyRef:
    """Stands in for a tensor in diffusers' converter: keeps its source key; slicing returns itself."""

    def __init__(self, key: str, shape: tuple[int, ...]):
        self.key, self.shape = key, torch.Size(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> "_KeyRef":
        return self


def ldm_vae_names(shapes: dict[str, tuple[int, ...]], config: dict) -> dict[str, str]:
    """diffusers name -> LDM name, from diffusers' own `convert_ldm_vae_checkpoint` run on shape-only stand-ins
    (so the names are diffusers' and no weight is read; the 1x1-conv attention weights are reshaped on read)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    refs = {k: _KeyRef(k, v) for k, v in shapes.items()}
    mapped = convert_ldm_vae_checkpoint(refs, {"down_block_types": config["down_block_types"],
                                               "up_block_types": config["up_block_types"]})
    return {name: ref.key for name, ref in mapped.items() if isinstance(ref, _KeyRef)}


@dataclass(frozen=True)
class VAESource:
    """An SD3 VAE found and checked, no weight read yet: a diffusers folder, or a plan over one file."""

    description: str
    config: dict
    plan: WeightPlan | None = None
    folder: Path | None = None

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """The diffusers AutoencoderKL in eval mode on `device`."""
        from diffusers import AutoencoderKL

        if self.folder is not None:
            try:
                vae = AutoencoderKL.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                                    torch_dtype=dtype)
            except (OSError, ValueError) as err:
                raise DRMError(f"VAE {self.folder}: cannot load a diffusers AutoencoderKL ({err})") from err
        else:
            state = self.plan.read(dtype)
            with torch.device("meta"):
                vae = AutoencoderKL(**self.config)
            vae.load_state_dict(state, strict=True, assign=True)
        return vae.to(device).eval()


def open_vae(path: str | Path) -> VAESource:
    """Find and check the SD3 VAE at `path` (any layout in VAE_EXPECTED) without reading a weight."""
    p = _local_path(path, "VAE", VAE_EXPECTED)
    if p.is_dir():
        return _diffusers_vae(p)
    file = SafetensorsFile.open(p)
    for names, probe in (("ldm", LDM_VAE_PROBE), ("diffusers", DIFFUSERS_VAE_PROBE)):
        prefixes = file.prefixes(probe)
        if prefixes:
            break
    else:
        raise DRMError(f"VAE {p}: no VAE in this file ({file.contents()}); pass {VAE_EXPECTED}")
    prefix = "first_stage_model." if "first_stage_model." in prefixes else prefixes[0]
    shapes = file.under(prefix)
    try:
        config = sd3_vae_config(shapes, names)
    except DRMError as err:
        raise DRMError(f"VAE {p} (under '{prefix}'): {err} (truncated or partial file?)") from err
    _check_latent_channels(config["latent_channels"], p)
    model_shapes = _vae_shapes(config, p)
    names_map = ldm_vae_names(shapes, config) if names == "ldm" else {k: k for k in model_shapes}
    sources = {k: prefix + names_map.get(k, k) for k in model_shapes}
    plan = WeightPlan(file, "VAE", sources, model_shapes).check(prefix)
    log.info("VAE: %s (%s names under '%s', %s)", p, names, prefix, file.dtypes[sources["encoder.conv_in.weight"]])
    return VAESource(f"{p} ({names} names under '{prefix}')", config, plan=plan)


def _vae_shapes(config: dict, path: Path) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    bad = [c for c in config["block_out_channels"] if c % config["norm_num_groups"]]
    if bad:
        raise DRMError(f"VAE {path}: block channels {config['block_out_channels']} are not multiples of SD3's "
                       f"{config['norm_num_groups']} norm groups; not an SD3 VAE")
    return _meta_shapes(lambda: AutoencoderKL(**config))


def _check_latent_channels(channels: int, path: Path) -> None:
    if channels != SD3_LATENT_CHANNELS:
        raise DRMError(f"VAE {path}: {channels} latent channels; SD3 latents have {SD3_LATENT_CHANNELS} (is this an "
                       "SD1.x/SDXL VAE?)")


def _diffusers_vae(folder: Path) -> VAESource:
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DRMError(f"VAE {folder}: a folder without config.json; pass {VAE_EXPECTED}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise DRMError(f"VAE {config_path}: not valid JSON ({err})") from err
    if not any(folder.glob("*.safetensors")):
        raise DRMError(f"VAE {folder}: no .safetensors weights in the folder (only safetensors are read)")
    _check_latent_channels(config.get("latent_channels"), folder)
    log.info("VAE: diffusers folder %s", folder)
    return VAESource(f"{folder} (diffusers folder)", config, folder=folder)


def load_sd3_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SD3 VAE at `path` (single-file checkpoint, VAE file with LDM or diffusers names, diffusers folder)
    as a diffusers AutoencoderKL in eval mode."""
    return open_vae(path).load(device, dtype)


# ----------------------------------------------------------------------------- text encoders

TEXT_EXPECTED = ("ComfyUI's models/text_encoders/ folder (clip_l, clip_g and t5xxl_fp16 / t5xxl_fp8_e4m3fn[_scaled] "
                 ".safetensors), a single-file checkpoint that includes them (e.g. "
                 "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors), those files themselves, or a diffusers "
                 "SD3/SD3.5 pipeline folder (text_encoder{,_2,_3}, tokenizer{,_2,_3})")


@dataclass(frozen=True)
class Candidate:
    """A text encoder found inside a file (not checked in full yet)."""

    file: SafetensorsFile
    prefix: str
    kind: str  # "clip" | "t5"
    role: str | None  # from a single-file checkpoint's prefix; None: decided from the width
    width: int
    precision: tuple[int, str]

    def __str__(self) -> str:
        where = f" under '{self.prefix}'" if self.prefix else ""
        return f"{self.file.path}{where} ({self.precision[1]})"


@dataclass(frozen=True)
class TextModelSource:
    """One of SD3's text encoders, found and checked: config, and a plan over a file or a diffusers subfolder."""

    role: str
    description: str
    config: Any  # CLIPTextConfig | T5Config
    plan: WeightPlan | None = None
    folder: Path | None = None

    def load(self, dtype: torch.dtype = torch.float32):
        """The transformers model (CLIPTextModelWithProjection or T5EncoderModel) in eval mode on the CPU."""
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        cls = T5EncoderModel if self.role == "t5xxl" else CLIPTextModelWithProjection
        if self.folder is not None:
            try:
                model = cls.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                            **_dtype_kwargs(dtype))
            except (OSError, ValueError) as err:
                raise DRMError(f"{ROLE_NAMES[self.role]} {self.folder}: cannot load ({err})") from err
        else:
            state = self.plan.read(dtype)
            model = cls.from_pretrained(None, config=self.config, state_dict=state, **_dtype_kwargs(dtype))
        return model.eval()


@dataclass(frozen=True)
class SD3TextFiles:
    """SD3's three text encoders and their tokenizers, found and checked; `load_models` reads the weights."""

    models: tuple[TextModelSource, TextModelSource, TextModelSource]  # CLIP-L, CLIP-G, T5-XXL
    tokenizers: tuple[Any, Any, Any]
    tokenizer_source: str

    def load_models(self, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
        """(CLIP-L, CLIP-G, T5-XXL) transformers models in `dtype`."""
        return tuple(source.load(dtype) for source in self.models)

    def describe(self) -> dict[str, str]:
        """Where every part comes from (recorded in the cache's settings)."""
        return {**{m.role: m.description for m in self.models}, "tokenizers": self.tokenizer_source}


def open_text_encoders(path: str | Path | Sequence[str | Path], tokenizers: str | Path | None = None) -> SD3TextFiles:
    """Find and check SD3's text encoders and tokenizers at `path` (any layout in TEXT_EXPECTED, or a list of
    files / folders) without reading a weight; `tokenizers` (ComfyUI or diffusers folder) overrides the search."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise DRMError(f"no text encoders given; pass {TEXT_EXPECTED}")
    local = [_local_path(p, "text encoders", TEXT_EXPECTED) for p in paths]
    diffusers = [p for p in local if p.is_dir() and _is_diffusers_pipeline(p)]
    if diffusers:
        if len(local) > 1:
            raise DRMError(f"text encoders {diffusers[0]}: a diffusers pipeline folder must be given alone")
        models = _diffusers_text_models(diffusers[0])
    else:
        models = _comfy_text_models(local)
    found_tokenizers, source = find_tokenizers(local, tokenizers)
    _check_sd3_widths(models)
    for model, tokenizer in zip(models, found_tokenizers):
        if len(tokenizer) > model.config.vocab_size:
            raise DRMError(f"tokenizer of {ROLE_NAMES[model.role]} ({source}) has {len(tokenizer)} tokens but "
                           f"{model.description} embeds only {model.config.vocab_size}: tokenizer and weights do not "
                           "belong together (pass the right --tokenizers)")
    return SD3TextFiles(models, found_tokenizers, source)


def _is_diffusers_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or any((folder / s).is_dir()
                                                           for s in DIFFUSERS_TEXT + DIFFUSERS_TOKENIZERS)


def _diffusers_text_models(root: Path) -> tuple[TextModelSource, ...]:
    from transformers import CLIPTextConfig, T5Config

    missing = [s for s in DIFFUSERS_TEXT + DIFFUSERS_TOKENIZERS if not (root / s).is_dir()]
    if missing:
        raise DRMError(f"text encoders {root}: missing subfolder(s) {missing}; expected a diffusers SD3/SD3.5 pipeline "
                       "folder with text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2 and "
                       "tokenizer_3")
    models = []
    for role, sub, config_cls in zip(ROLES, DIFFUSERS_TEXT, (CLIPTextConfig, CLIPTextConfig, T5Config)):
        try:
            config = config_cls.from_pretrained(root / sub, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DRMError(f"{ROLE_NAMES[role]} {root / sub}: cannot read its config.json ({err})") from err
        if not any((root / sub).glob("*.safetensors")):
            raise DRMError(f"{ROLE_NAMES[role]} {root / sub}: no .safetensors weights (only safetensors are read)")
        models.append(TextModelSource(role, f"{root / sub} (diffusers folder)", config, folder=root / sub))
    return tuple(models)


def _comfy_text_models(paths: list[Path]) -> tuple[TextModelSource, ...]:
    files = []
    for p in paths:
        if p.is_file():
            files.append(SafetensorsFile.open(p))
            continue
        for found in sorted(p.rglob("*.safetensors")):
            try:
                files.append(SafetensorsFile.open(found))
            except DRMError as err:
                log.warning("skipping %s", err)
    candidates = [c for file in files for c in _candidates(file)]
    chosen = _choose(candidates)
    missing = [ROLE_NAMES[r] for r in ROLES if r not in chosen]
    if missing:
        found = "; ".join(f"{c} {c.kind} width {c.width}" for c in candidates) or "no text encoder"
        where = ", ".join(str(p) for p in paths)
        raise DRMError(f"text encoders {where}: no {', '.join(missing)} found (found: {found}); pass {TEXT_EXPECTED}")
    return tuple(_text_model(chosen[role], role) for role in ROLES)


def _candidates(file: SafetensorsFile) -> list[Candidate]:
    """Every CLIP text model and SD3-style T5 encoder in a file; other T5s are skipped with the reason logged."""
    out = []
    for prefix in file.prefixes(CLIP_PROBE):
        s = file.under(prefix)
        fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
        if "text_model.embeddings.token_embedding.weight" not in s or fc1 not in s:
            continue
        out.append(Candidate(file, prefix, "clip", _role(prefix), s["text_model.embeddings.token_embedding.weight"][1],
                             _precision(file, prefix, fc1)))
    for prefix in file.prefixes(T5_PROBE):
        s = file.under(prefix)
        wi = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
        embed = s.get("shared.weight", s.get(T5_TIED))
        if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in s:
            log.info("skipping %s: a UMT5 encoder (attention bias in every block), not SD3's T5-XXL", file.path)
        elif wi not in s or embed is None:
            log.info("skipping %s: a T5 without gated feed-forward (T5 v1.0), not SD3's T5-XXL (v1.1)", file.path)
        elif embed[1] != CONTEXT_DIM:
            log.info("skipping %s: a T5 of width %d; SD3's T5-XXL is %d wide", file.path, embed[1], CONTEXT_DIM)
        else:
            out.append(Candidate(file, prefix, "t5", _role(prefix) or "t5xxl", embed[1], _precision(file, prefix, wi)))
    return out


def _role(prefix: str) -> str | None:
    """The role a single-file checkpoint's prefix names (text_encoders.clip_l.transformer. -> clip_l)."""
    match = re.search(r"(?:^|\.)(clip_l|clip_g|t5xxl)\.", prefix)
    return match.group(1) if match else None


def _precision(file: SafetensorsFile, prefix: str, key: str) -> tuple[int, str]:
    """(rank, label) of a component from one of its Linear weights: float32 > float16 > bfloat16 > scaled fp8 > fp8."""
    dtype = file.dtypes[prefix + key]
    if dtype in FP8:
        scaled = prefix + key.removesuffix(".weight") + ".scale_weight" in file.shapes
        return (2, FP8[dtype] + " scaled") if scaled else (1, FP8[dtype])
    return PRECISION.get(dtype, (0, dtype))


def _choose(candidates: list[Candidate]) -> dict[str, Candidate]:
    """Role -> the highest-precision candidate for it (CLIP roles from the prefix, else from the width)."""
    widths = {c.width for c in candidates if c.kind == "clip" and c.role is None}
    by_role: dict[str, list[Candidate]] = {}
    for c in candidates:
        role = c.role or _clip_role(c.width, widths)
        if role is not None:
            by_role.setdefault(role, []).append(c)
    chosen = {}
    for role, found in by_role.items():
        ranked = sorted(found, key=lambda c: (-c.precision[0], str(c.file.path), c.prefix))
        chosen[role] = ranked[0]
        log.info("%s: %s%s", ROLE_NAMES[role], ranked[0],
                 f"; not used: {', '.join(str(c) for c in ranked[1:])}" if len(ranked) > 1 else "")
    return chosen


def _clip_role(width: int, widths: set[int]) -> str | None:
    """CLIP-L is 768 wide and CLIP-G 1280; otherwise the narrowest is taken as CLIP-L and the widest as CLIP-G."""
    if width in KNOWN_CLIP_WIDTHS:
        return KNOWN_CLIP_WIDTHS[width]
    if width == min(widths) and 768 not in widths:
        return "clip_l"
    if width == max(widths) and 1280 not in widths:
        return "clip_g"
    return None


def _text_model(candidate: Candidate, role: str) -> TextModelSource:
    plan, config = (_t5_plan if role == "t5xxl" else _clip_plan)(candidate, role)
    return TextModelSource(role, str(candidate), config, plan=plan)


def _clip_plan(c: Candidate, role: str) -> tuple[WeightPlan, Any]:
    """CLIPTextConfig from the shapes (head dim 64; activation by role, as ComfyUI's configs) and the key plan."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    s = c.file.under(c.prefix)
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    if hidden % CLIP_HEAD_DIM:
        raise DRMError(f"{c}: CLIP width {hidden} is not a multiple of the head dim {CLIP_HEAD_DIM}")
    transposed, source = frozenset(), c.prefix + "text_projection.weight"
    if "text_projection.weight" in s:
        projection = s["text_projection.weight"][0]
    elif "text_projection" in s:  # saved by old ComfyUI CLIPSave: transposed (comfy/sd.py)
        projection, source = s["text_projection"][1], c.prefix + "text_projection"
        transposed = {"text_projection.weight"}
    elif role == "clip_l":  # SD3 pools CLIP-L unprojected, so its projection is never used
        projection, source = hidden, ""
    else:
        raise DRMError(f"{c}: CLIP-G has no text_projection, which SD3's pooled vector needs")
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // CLIP_HEAD_DIM,
                            intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=_max_index(s, r"text_model\.encoder\.layers\.(\d+)\."),
                            max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
                            projection_dim=projection, hidden_act=CLIP_ACT[role], layer_norm_eps=1e-5,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1,  # CLIP's are its last two
                            pad_token_id=1)
    shapes = _meta_shapes(lambda: CLIPTextModelWithProjection(config))
    sources = {k: c.prefix + k for k in shapes}
    sources["text_projection.weight"] = source
    return WeightPlan(c.file, ROLE_NAMES[role], sources, shapes, frozenset(transposed)).check(c.prefix), config


def _t5_plan(c: Candidate, role: str) -> tuple[WeightPlan, Any]:
    """T5Config from the shapes (heads and buckets from the relative attention bias, d_ff from wi_0) and the plan."""
    from transformers import T5Config, T5EncoderModel

    s = c.file.under(c.prefix)
    embed = "shared.weight" if "shared.weight" in s else T5_TIED
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    query = "encoder.block.0.layer.0.SelfAttention.q.weight"
    absent = [k for k in (bias, query) if k not in s]
    if absent:
        raise DRMError(f"{c}: T5 tensors {absent} are missing (truncated or partial file?)")
    buckets, heads = s[bias]
    vocab, d_model = s[embed]
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=s[query][0] // heads, num_heads=heads,
                      d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                      num_layers=_max_index(s, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                      use_cache=False)
    shapes = _meta_shapes(lambda: T5EncoderModel(config))
    shapes.pop(T5_TIED)  # tied to shared.weight
    sources = {k: c.prefix + k for k in shapes}
    sources["shared.weight"] = c.prefix + embed
    plan = WeightPlan(c.file, ROLE_NAMES[role], sources, shapes).check(c.prefix, ignored=[T5_TIED])
    return plan, config


def _check_sd3_widths(models: Sequence[TextModelSource]) -> None:
    """T5 is 4096 wide; CLIP-L hidden + CLIP-G projection = 2048 (pooled); CLIP-L + CLIP-G hidden fit in 4096."""
    clip_l, clip_g, t5 = models
    l_width, g_width, g_projection = clip_l.config.hidden_size, clip_g.config.hidden_size, clip_g.config.projection_dim
    problems = []
    if t5.config.d_model != CONTEXT_DIM:
        problems.append(f"T5-XXL ({t5.description}) is {t5.config.d_model} wide, SD3 needs {CONTEXT_DIM}")
    if l_width + g_projection != POOLED_DIM:
        problems.append(f"CLIP-L width {l_width} + CLIP-G projection {g_projection} != the pooled {POOLED_DIM}")
    if l_width + g_width > CONTEXT_DIM:
        problems.append(f"CLIP-L width {l_width} + CLIP-G width {g_width} > {CONTEXT_DIM}")
    if problems:
        raise DRMError(f"not SD3's text encoders (CLIP-L {clip_l.description}, CLIP-G {clip_g.description}): "
                       + "; ".join(problems))


# ----------------------------------------------------------------------------- tokenizers

def comfyui_roots(text_paths: Sequence[Path], module_file: Path | None = None) -> list[Path]:
    """ComfyUI folders that may hold the tokenizers, in search order: the install holding the text encoder files,
    the install this pack sits in (<ComfyUI>/custom_nodes/<pack>/), then COMFYUI_PATH."""
    module_file = Path(__file__) if module_file is None else module_file
    starts = [*(p.absolute() for p in text_paths), module_file.absolute(), module_file.resolve()]
    roots = [parent for start in starts for parent in start.parents]
    if os.environ.get("COMFYUI_PATH"):
        roots.append(Path(os.environ["COMFYUI_PATH"]).expanduser().absolute())
    return list(dict.fromkeys(roots))


def find_tokenizers(text_paths: Sequence[Path], override: str | Path | None = None) -> tuple[tuple[Any, Any, Any], str]:
    """(CLIP-L, CLIP-G, T5) tokenizers and where they came from: `override`, else the diffusers pipeline folder
    of the text encoders, else a ComfyUI install (see `comfyui_roots`). Errors say which is missing and where."""
    if override is not None:
        root = _local_path(override, "--tokenizers", "a ComfyUI folder or a diffusers SD3 pipeline folder")
        if _is_comfyui(root):
            return _comfyui_tokenizers(root), f"ComfyUI {root}"
        if any((root / s).is_dir() for s in DIFFUSERS_TOKENIZERS):
            return _diffusers_tokenizers(root), f"diffusers {root}"
        raise DRMError(f"--tokenizers {root}: neither a ComfyUI folder ({COMFY_CLIP_TOKENIZER}, {COMFY_T5_TOKENIZER}) "
                       f"nor a diffusers SD3 pipeline folder ({', '.join(DIFFUSERS_TOKENIZERS)})")
    if len(text_paths) == 1 and text_paths[0].is_dir() and _is_diffusers_pipeline(text_paths[0]):
        return _diffusers_tokenizers(text_paths[0]), f"diffusers {text_paths[0]}"
    roots = comfyui_roots(text_paths)
    for root in roots:
        if _is_comfyui(root):
            return _comfyui_tokenizers(root), f"ComfyUI {root}"
    raise DRMError(f"no tokenizers for the SD3 text encoders: looked for {COMFY_CLIP_TOKENIZER} and "
                   f"{COMFY_T5_TOKENIZER} in the ComfyUI install around the text encoder files, around this pack and "
                   f"in COMFYUI_PATH ({os.environ.get('COMFYUI_PATH') or 'not set'}); searched {len(roots)} "
                   f"folders from {text_paths[0]} up. Pass --tokenizers <ComfyUI folder> or <diffusers SD3 folder with tokenizer, "
                   "tokenizer_2, tokenizer_3>, or set COMFYUI_PATH")


def _is_comfyui(root: Path) -> bool:
    return (root / COMFY_CLIP_TOKENIZER).is_dir() or (root / COMFY_T5_TOKENIZER).is_dir()


def _comfyui_tokenizers(root: Path) -> tuple[Any, Any, Any]:
    """CLIPTokenizer (for CLIP-L and CLIP-G) and T5TokenizerFast, the classes ComfyUI loads these folders with."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    for sub, what in ((COMFY_CLIP_TOKENIZER, "CLIP"), (COMFY_T5_TOKENIZER, "T5")):
        if not (root / sub).is_dir():
            raise DRMError(f"ComfyUI {root}: the {what} tokenizer folder {root / sub} is missing (an old or partial "
                           "ComfyUI?); pass --tokenizers <ComfyUI folder or diffusers SD3 folder>")
    clip = _load_tokenizer(CLIPTokenizer, root / COMFY_CLIP_TOKENIZER, "CLIP")
    return clip, clip, _load_tokenizer(T5TokenizerFast, root / COMFY_T5_TOKENIZER, "T5")


def _diffusers_tokenizers(root: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    missing = [s for s in DIFFUSERS_TOKENIZERS if not (root / s).is_dir()]
    if missing:
        raise DRMError(f"tokenizers {root}: missing subfolder(s) {missing} of a diffusers SD3 pipeline folder")
    return tuple(_load_tokenizer(AutoTokenizer, root / s, s) for s in DIFFUSERS_TOKENIZERS)


def _load_tokenizer(cls: Any, folder: Path, what: str) -> Any:
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise DRMError(f"{what} tokenizer {folder}: cannot load ({err})") from err
