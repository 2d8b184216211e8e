"""`python -m training cache`: encode every unique image and prompt once into a sharded preference cache.

Images go through the SD3 VAE (model-space latents, sampled with noise fixed per image), prompts
through SD3's three text encoders exactly as ComfyUI encodes them (see `training.encoders`). The
VAE and text encoders may come in ComfyUI's layouts (a single-file checkpoint, models/vae/,
models/text_encoders/) or as diffusers folders (`training.sd3_files`). The run is resumable:
restarted with the same arguments it skips every id already in a whole shard (`--out` keeps the
arguments in `cache-args.json` and refuses to mix runs made with others). Training reads only the
cache; no VAE or text encoder is loaded then.

Every input is checked before the first image is encoded: `--out` is writable, the VAE's and the
three text encoders' files are opened and every tensor name and shape is checked against the
architecture they will be built with, the tokenizers are loaded, the data files are read. The
encoders themselves are still built one after the other when their pass starts: SD3's text
encoders take 10-20 GB, which need not sit next to the VAE, and after the checks building only
reads bytes whose names and shapes are already known.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from drm_core import DRMError

from .cache_format import CacheWriter
from .checkpointing import check_writable
from .data import ImageReader, PreferenceData, describe_image, load_preferences
from .encoders import (CONTEXT_DIM, CONTEXT_TOKENS, POOLED_DIM, ImageEncoder, SD3TextEncoder, SD3VAEEncoder,
                       TextEncoder, check_resolution)
from .sd3_files import open_text_encoders, open_vae

log = logging.getLogger(__name__)

ARGS_FILE = "cache-args.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `cache` command's options."""
    parser.add_argument("--data", action="append", required=True, metavar="FILE",
                        help="preference data: .jsonl/.json/.csv ({prompt, chosen, rejected} or HPSv3 {prompt, "
                             "path1, path2, confidence}), Pick-a-Pic .parquet or a folder of shards; repeatable")
    parser.add_argument("--out", required=True, help="cache folder (created; an interrupted run resumes here)")
    parser.add_argument("--vae", required=True, metavar="PATH",
                        help="the SD3 VAE: a single-file SD3/SD3.5 checkpoint (its first_stage_model.*), a VAE "
                             ".safetensors from ComfyUI's models/vae/ (LDM or diffusers names), or a diffusers VAE "
                             "folder / SD3 pipeline folder")
    parser.add_argument("--text-encoders", required=True, nargs="+", metavar="PATH",
                        help="SD3's CLIP-L, CLIP-G and T5-XXL: ComfyUI's models/text_encoders/ folder (recognised by "
                             "their tensors, not their names; fp16, fp8_e4m3fn or scaled fp8, the highest precision "
                             "is used), a single-file checkpoint that includes them (e.g. "
                             "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors), the files themselves, or a "
                             "diffusers SD3/SD3.5 pipeline folder")
    parser.add_argument("--tokenizers", default=None, metavar="PATH",
                        help="where the tokenizers come from: a ComfyUI folder (comfy/sd1_tokenizer, "
                             "comfy/text_encoders/t5_tokenizer) or a diffusers SD3 folder (tokenizer{,_2,_3}). "
                             "Default: the diffusers folder given as --text-encoders, else the ComfyUI install holding the "
                             "text encoder files or this pack, else $COMFYUI_PATH")
    parser.add_argument("--resolution", type=int, default=512, help="square image side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="images / prompts per encoder call (default 8)")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per cache shard (default 1024)")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="encoder compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--store-dtype", default="float16", choices=list(DTYPES),
                        help="dtype of the stored latents and embeddings (default float16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VAE latent sampling noise (default 0)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N usable pairs")
    parser.add_argument("--no-check-images", action="store_true",
                        help="skip opening every image header while loading (unreadable images are still "
                             "skipped when encoding)")


def run(args: argparse.Namespace) -> int:
    """Check every input, load the pairs, encode what is not cached yet, write pairs and cache.json."""
    for name in ("batch_size", "shard_size", "resolution"):
        if getattr(args, name) < 1:
            raise DRMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_resolution(args.resolution)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda")
                                                               else torch.float32)
    check_writable(args.out, "--out")
    vae = open_vae(args.vae)
    text_paths = args.text_encoders[0] if len(args.text_encoders) == 1 else args.text_encoders
    text = open_text_encoders(text_paths, args.tokenizers)
    data = load_preferences(args.data, limit=args.limit, check_images=not args.no_check_images)
    settings = {"data": data.sources, "limit": args.limit, "resolution": args.resolution, "seed": args.seed,
                "vae": vae.description, "text_encoders": text.describe(), "dtype": str(dtype).removeprefix("torch."),
                "store_dtype": args.store_dtype, "check_images": not args.no_check_images,
                "content": data_digest(data)}
    build_cache(data, args.out,
                image_encoder=lambda: SD3VAEEncoder(vae.load(device, dtype), args.resolution, device, dtype,
                                                    args.seed),
                text_encoder=lambda: SD3TextEncoder.from_files(text, device, dtype),
                text_scheme=SD3TextEncoder.scheme, settings=settings, batch_size=args.batch_size,
                shard_size=args.shard_size, store_dtype=DTYPES[args.store_dtype])
    return 0


def data_digest(data: PreferenceData) -> str:
    """sha1 of the prompts, image references and pairs: ids in a resumed cache must mean the same items."""
    content = json.dumps([data.prompts, [describe_image(r) for r in data.images], data.pairs])
    return hashlib.sha1(content.encode()).hexdigest()


def build_cache(data: PreferenceData, out: str | Path, image_encoder: Callable[[], ImageEncoder],
                text_encoder: Callable[[], TextEncoder], text_scheme: dict, settings: dict,
                batch_size: int = 8, shard_size: int = 1024, store_dtype: torch.dtype = torch.float16) -> Path:
    """Encode what `out` lacks (encoders are built only if needed), then write pairs and cache.json."""
    if not data.pairs:
        raise DRMError(f"no usable preference pairs in {data.sources} (skipped: {dict(data.skipped)})")
    writer = CacheWriter(out, shard_size)
    _check_settings(writer.root, {**settings, "text": text_scheme})
    failed = _encode_images(writer, data, image_encoder, batch_size, store_dtype)
    truncated = _encode_prompts(writer, data, text_encoder, batch_size, store_dtype)
    writer.flush("images")
    writer.flush("prompts")
    pairs, confidence, dropped = _usable_pairs(data, writer.done_ids("images"), writer.done_ids("prompts"))
    skipped = dict(data.skipped)
    if dropped:
        skipped["unreadable_image"] = skipped.get("unreadable_image", 0) + dropped
        log.warning("%d pair(s) dropped: %d image(s) could not be decoded", dropped, len(failed))
    if not len(pairs):
        raise DRMError(f"{writer.root}: no pair left with both images encoded (skipped: {skipped})")
    extra = {"skipped": skipped, "sources": data.sources, "settings": settings,
             "truncated_prompts": truncated}
    writer.finish(pairs, confidence, text=text_scheme, extra=extra)
    log.info("cache %s: %d pairs, %d images, %d prompts; skipped %s", writer.root, len(pairs), len(data.images),
             len(data.prompts), skipped or "nothing")
    return writer.root


def _check_settings(root: Path, settings: dict) -> None:
    """Record the run's settings in `root`, or refuse to resume a cache made with different ones."""
    path = root / ARGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise DRMError(f"--out {root} holds a cache made with other settings ({details}); use a new --out "
                           "or delete that folder")
        return
    if any(root.glob("*.safetensors")):
        raise DRMError(f"--out {root} already holds cache shards but no {ARGS_FILE}; use an empty folder")
    path.write_text(json.dumps(settings, indent=2))


def _batches(ids: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


def _encode_images(writer: CacheWriter, data: PreferenceData, make_encoder: Callable[[], ImageEncoder],
                   batch_size: int, store_dtype: torch.dtype) -> set[int]:
    """Encode images not yet in whole shards; returns ids that could not be decoded (logged)."""
    done = writer.done_ids("images")
    todo = [i for i in range(len(data.images)) if i not in done]
    log.info("images: %d unique, %d cached, %d to encode", len(data.images), len(done), len(todo))
    failed: set[int] = set()
    if not todo:
        return failed
    encoder, reader = make_encoder(), ImageReader()
    with tqdm(total=len(todo), desc="images", unit="img") as bar:
        for batch in _batches(todo, batch_size):
            images, ids = _read_images(reader, data, batch, failed)
            if ids:
                latents = encoder.encode(images, ids)
                for image_id, latent in zip(ids, latents):
                    writer.add_image(image_id, latent.to(store_dtype))
            bar.update(len(batch))
    return failed


def _read_images(reader: ImageReader, data: PreferenceData, batch: list[int], failed: set[int]
                 ) -> tuple[list[Image.Image], list[int]]:
    """Decoded images of a batch of ids; undecodable ones are logged and added to `failed`."""
    images, ids = [], []
    for image_id in batch:
        ref = data.images[image_id]
        try:
            images.append(reader.open(ref))
            ids.append(image_id)
        except DECODE_ERRORS as err:
            log.warning("skipping image %s: cannot decode (%s)", describe_image(ref), err)
            failed.add(image_id)
    return images, ids


def _encode_prompts(writer: CacheWriter, data: PreferenceData, make_encoder: Callable[[], TextEncoder],
                    batch_size: int, store_dtype: torch.dtype) -> int:
    """Encode prompts not yet in whole shards; returns how many were truncated to the cache's length."""
    done = writer.done_ids("prompts")
    todo = [i for i in range(len(data.prompts)) if i not in done]
    log.info("prompts: %d unique, %d cached, %d to encode", len(data.prompts), len(done), len(todo))
    if not todo:
        return 0
    encoder = make_encoder()
    with tqdm(total=len(todo), desc="prompts", unit="prompt") as bar:
        for batch in _batches(todo, batch_size):
            context, pooled = encoder.encode([data.prompts[i] for i in batch])
            _check_text_shapes(context, pooled, len(batch))
            for prompt_id, c, p in zip(batch, context, pooled):
                writer.add_prompt(prompt_id, c.to(store_dtype), p.to(store_dtype))
            bar.update(len(batch))
    return int(getattr(encoder, "truncated", 0))


def _check_text_shapes(context: Any, pooled: Any, batch: int) -> None:
    want_c, want_p = (batch, CONTEXT_TOKENS, CONTEXT_DIM), (batch, POOLED_DIM)
    if tuple(context.shape) != want_c or tuple(pooled.shape) != want_p:
        raise DRMError(f"text encoder returned context {tuple(context.shape)} and pooled {tuple(pooled.shape)}; "
                       f"the cache needs {want_c} and {want_p} (SD3 conditioning)")


def _usable_pairs(data: PreferenceData, images: set[int], prompts: set[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pairs whose prompt and both images are encoded: int64 [P, 3], confidence [P], dropped count."""
    keep = [p for p in data.pairs if p[0] in prompts and p[1] in images and p[2] in images]
    pairs = torch.tensor([p[:3] for p in keep], dtype=torch.int64).reshape(-1, 3)
    confidence = torch.tensor([p[3] for p in keep], dtype=torch.float32)
    return pairs, confidence, len(data.pairs) - len(keep)
