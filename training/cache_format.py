"""The preference cache: latents and text embeddings encoded once, read lazily while training.

    cache_dir/
      cache.json                 {"format": "drm-cache", "version": 1, "latent_shape", "text": {...}, "counts"}
      images-NNNNN.safetensors   "latents" [n, 16, h, w] model space, "ids" int64 [n]
      prompts-NNNNN.safetensors  "context" [m, N, D], "pooled" [m, Dp], "ids" int64 [m]
      pairs.safetensors          "prompt", "win", "lose" int64 [P], "confidence" float32 [P]
Shards are written atomically, so an interrupted `cache` run resumes after its last whole shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from drm_core import DRMError
from drm_core.checkpoint import atomic_save_file

FORMAT = "drm-cache"
VERSION = 1


class CacheWriter:
    """Appends image latents and prompt embeddings in shards; `finish` writes pairs and cache.json."""

    def __init__(self, root: str | Path, shard_size: int = 1024):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self._pending: dict[str, list[tuple[int, dict[str, Tensor]]]] = {"images": [], "prompts": []}

    def done_ids(self, kind: str) -> set[int]:
        """Ids already in whole shards on disk (for resuming)."""
        ids: set[int] = set()
        for path in sorted(self.root.glob(f"{kind}-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                ids.update(f.get_tensor("ids").tolist())
        return ids

    def add_image(self, image_id: int, latent: Tensor) -> None:
        self._add("images", image_id, {"latents": latent})

    def add_prompt(self, prompt_id: int, context: Tensor, pooled: Tensor) -> None:
        self._add("prompts", prompt_id, {"context": context, "pooled": pooled})

    def _add(self, kind: str, item_id: int, tensors: dict[str, Tensor]) -> None:
        self._pending[kind].append((item_id, {k: v.detach().cpu() for k, v in tensors.items()}))
        if len(self._pending[kind]) >= self.shard_size:
            self.flush(kind)

    def flush(self, kind: str) -> None:
        items = self._pending[kind]
        if not items:
            return
        index = len(list(self.root.glob(f"{kind}-*.safetensors")))
        tensors = {k: torch.stack([t[k] for _, t in items]).contiguous() for k in items[0][1]}
        tensors["ids"] = torch.tensor([i for i, _ in items], dtype=torch.int64)
        atomic_save_file(tensors, self.root / f"{kind}-{index:05d}.safetensors", {"format": FORMAT})
        self._pending[kind] = []

    def finish(self, pairs: Tensor, confidence: Tensor | None = None, text: dict | None = None,
               extra: dict | None = None) -> Path:
        """pairs: int64 [P, 3] of (prompt id, winner image id, loser image id)."""
        self.flush("images")
        self.flush("prompts")
        pairs = pairs.to(torch.int64)
        conf = torch.ones(len(pairs)) if confidence is None else confidence.float()
        atomic_save_file({"prompt": pairs[:, 0].contiguous(), "win": pairs[:, 1].contiguous(),
                          "lose": pairs[:, 2].contiguous(), "confidence": conf.contiguous()},
                         self.root / "pairs.safetensors", {"format": FORMAT})
        cache = PreferenceCache(self.root, check_meta=False)
        meta = {"format": FORMAT, "version": VERSION, "latent_shape": list(cache.latent_shape),
                "text": text or {}, "counts": {"images": cache.n_images, "prompts": cache.n_prompts,
                                               "pairs": len(pairs)}, **(extra or {})}
        (self.root / "cache.json").write_text(json.dumps(meta, indent=2))
        return self.root


@dataclass
class _Index:
    files: list[Path]
    where: dict[int, tuple[int, int]]  # id -> (file index, row)
    offsets: list[int]  # first global row of each file (for the in-memory copy)


def _index(root: Path, kind: str) -> _Index:
    files = sorted(root.glob(f"{kind}-*.safetensors"))
    where: dict[int, tuple[int, int]] = {}
    offsets, total = [], 0
    for fi, path in enumerate(files):
        with safe_open(str(path), "pt") as f:
            ids = f.get_tensor("ids").tolist()
        offsets.append(total)
        total += len(ids)
        for row, item in enumerate(ids):
            where[item] = (fi, row)
    return _Index(files, where, offsets)


class PreferenceCache(Dataset):
    """Pairs (winner latent, loser latent, context, pooled, confidence) read lazily from a cache dir."""

    def __init__(self, root: str | Path, pair_indices: Tensor | None = None, check_meta: bool = True,
                 in_memory: bool = False):
        self.root = Path(root)
        if check_meta:
            meta_path = self.root / "cache.json"
            if not meta_path.is_file():
                raise DRMError(f"{self.root}: not a preference cache (no cache.json); run `python -m training cache`")
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
                raise DRMError(f"{meta_path}: unsupported cache format {self.meta.get('format')} "
                               f"v{self.meta.get('version')} (expected {FORMAT} v{VERSION})")
        else:
            self.meta = {}
        self._images = _index(self.root, "images")
        self._prompts = _index(self.root, "prompts")
        with safe_open(str(self.root / "pairs.safetensors"), "pt") as f:
            self.pairs = torch.stack([f.get_tensor(k) for k in ("prompt", "win", "lose")], 1)  # [P, 3]
            self.confidence = f.get_tensor("confidence")
        missing = [int(i) for i in self.pairs[:, 1:].flatten().tolist() if int(i) not in self._images.where][:5]
        missing += [int(i) for i in self.pairs[:, 0].tolist() if int(i) not in self._prompts.where][:5]
        if missing:
            raise DRMError(f"{self.root}: pairs reference ids missing from the shards, e.g. {missing}")
        self.indices = torch.arange(len(self.pairs)) if pair_indices is None else pair_indices
        self._memory: dict[str, dict[str, Tensor]] | None = None
        if in_memory:
            self._memory = {"images": _load_all(self._images, ("latents",)),
                            "prompts": _load_all(self._prompts, ("context", "pooled"))}

    @property
    def n_images(self) -> int:
        return len(self._images.where)

    @property
    def n_prompts(self) -> int:
        return len(self._prompts.where)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        with safe_open(str(self._images.files[0]), "pt") as f:
            return tuple(f.get_slice("latents").get_shape()[1:])

    def subset(self, pair_indices: Tensor) -> "PreferenceCache":
        view = object.__new__(PreferenceCache)
        view.__dict__.update(self.__dict__)
        view.indices = self.indices[pair_indices]
        return view

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, kind: str, item_id: int, key: str) -> Tensor:
        index = self._images if kind == "images" else self._prompts
        fi, row = index.where[item_id]
        if self._memory is not None:
            return self._memory[kind][key][index.offsets[fi] + row]
        with safe_open(str(index.files[fi]), "pt") as f:
            return f.get_slice(key)[row:row + 1][0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        prompt, win, lose = (int(v) for v in self.pairs[self.indices[i]])
        return {"win": self._get("images", win, "latents").float(), "lose": self._get("images", lose, "latents").float(),
                "context": self._get("prompts", prompt, "context").float(),
                "pooled": self._get("prompts", prompt, "pooled").float(),
                "confidence": self.confidence[self.indices[i]]}


def _load_all(index: _Index, keys: tuple[str, ...]) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for path in index.files:
        with safe_open(str(path), "pt") as f:
            for k in keys:
                out[k].append(f.get_tensor(k))
    return {k: torch.cat(v) for k, v in out.items()}
