"""Metrics to JSONL (always) and TensorBoard (when installed), from the main process only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from drm_core import DRMError

log = logging.getLogger(__name__)


class MetricLogger:
    """Append {"step", **values} lines to out/metrics.jsonl; on resume drop lines past the resumed step."""

    def __init__(self, out: Path, enabled: bool = True, truncate_after: int | None = None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log.info("tensorboard not installed: metrics go to %s only", self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, array: np.ndarray) -> None:
        """Log an RGB image [H, W, 3] uint8 to TensorBoard (no-op without it: the PNG on disk is the record)."""
        if not self.enabled or self._tb is None:
            return
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise DRMError(f"MetricLogger.image({tag!r}): expected an [H, W, 3] uint8 array, got "
                           f"{list(array.shape)} {array.dtype}")
        self._tb.add_image(tag, array, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
