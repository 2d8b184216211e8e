"""How a DRM file asks to be scored: the sigma for clean latents and the timestep table it snaps to.

A DRM checkpoint's `drm` header may hold the key `scoring` (JSON object; absent = `{"sigma": 0.0}`):

    "scoring": {
      "sigma": 0.1,              # noise level at which to score a *clean* latent; 0 = score it as it is
      "sigma_table": {           # optional: the model was trained on a discrete table of sigmas only;
        "kind": "flow-shift",    #   snap the sigma to its nearest entry before noising
        "steps": 1000,           #   table = shift * s / (1 + (shift - 1) * s), s = k / steps, k = steps..1,
        "shift": 3.0             #   in float32, as diffusers' FlowMatchEulerDiscreteScheduler builds it
      },
      "note": "..."              # free text shown to users
    }

Scoring nodes use it when their sigma is "auto"; the step-wise samplers score candidates at the
next sigma of the schedule and ignore it. DRMs trained with `train-drm` recommend sigma 0 (their
accuracy is highest on clean latents, and no noise means deterministic scores); an imported
DiNa-LRM recommends 0.1 on its 1000-entry shift-3 table (0.1 -> 0.100746).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import DRMError


@dataclass(frozen=True)
class SigmaTable:
    """A discrete flow-matching sigma table: shift-transformed k / steps for k = steps..1 (descending, float32)."""

    steps: int = 1000
    shift: float = 3.0
    kind: str = "flow-shift"

    def __post_init__(self) -> None:
        if self.kind != "flow-shift":
            raise DRMError(f"scoring.sigma_table.kind must be 'flow-shift', got {self.kind!r}")
        if int(self.steps) < 1 or float(self.shift) <= 0:
            raise DRMError(f"scoring.sigma_table needs steps >= 1 and shift > 0, got {self.steps}, {self.shift}")

    def sigmas(self) -> Tensor:
        """The table, float32 [steps], from 1 down to shift(1 / steps)."""
        t = torch.arange(self.steps, 0, -1, dtype=torch.float32) / self.steps  # [steps]
        return self.shift * t / (1 + (self.shift - 1) * t)

    def snap(self, sigma: float) -> float:
        """The table entry nearest to `sigma` (the first on a tie, as torch.argmin picks)."""
        table = self.sigmas()
        return float(table[torch.argmin((table - sigma).abs())])


@dataclass(frozen=True)
class ScoringConvention:
    """A DRM's recommended way to score clean latents (header key `scoring`, see the module docstring)."""

    sigma: float = 0.0
    sigma_table: SigmaTable | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.sigma) <= 1.0:
            raise DRMError(f"scoring.sigma must lie in [0, 1], got {self.sigma}")

    @property
    def recommended_sigma(self) -> float:
        """The sigma to score at: `sigma`, snapped to the table when there is one (0 stays 0: clean)."""
        if self.sigma_table is None or self.sigma == 0:
            return float(self.sigma)
        return self.sigma_table.snap(float(self.sigma))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sigma": float(self.sigma)}
        if self.sigma_table is not None:
            table = self.sigma_table
            out["sigma_table"] = {"kind": table.kind, "steps": int(table.steps), "shift": float(table.shift)}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "ScoringConvention":
        """Parse a header's `scoring` value (None = the default, sigma 0); raises DRMError on a bad value."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or not isinstance(d.get("sigma", 0.0), (int, float)):
            raise DRMError(f"'scoring' must be an object with a numeric 'sigma', got {d!r}")
        table = d.get("sigma_table")
        if table is not None:
            if not isinstance(table, dict):
                raise DRMError(f"'scoring.sigma_table' must be an object, got {table!r}")
            try:
                table = SigmaTable(**table)
            except TypeError as err:
                raise DRMError(f"'scoring.sigma_table' has unknown fields ({err})") from err
        return cls(float(d.get("sigma", 0.0)), table, str(d.get("note", "")))
