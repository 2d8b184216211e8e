"""Casting layers: a DRM whose weights live partly off the compute device, or in fp8, still scores exactly.

A host that manages memory (ComfyUI) passes its own layer classes, e.g. `comfy.ops.manual_cast`; drm_core
never imports the host. `use_casting_layers` turns the DRM's plain torch layers into those classes in place
(same parameters, same names, so checkpoints and state dicts are unchanged) and gives every other leaf module
that holds parameters (diffusers' RMSNorm) the same protocol with `CastParameters`: when the host sets
`comfy_cast_weights` on a layer it left off the device, the layer copies its parameters to the input's device
and dtype for each call. `store_weights` then keeps the big matrices in a storage dtype such as fp8.
"""

from __future__ import annotations

from functools import lru_cache

from types import SimpleNamespace

import torch
from torch import Tensor, nn

HOST_LAYERS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")
"""torch layers the host's operations namespace replaces (the ones a DRM is built from)."""
STORED_LAYERS = (nn.Linear, nn.Conv2d)
"""Layers whose weight matrices `store_weights` converts; norms, biases and tables keep the compute dtype."""


class CastParameters:
    """Host casting protocol for a leaf module: with `comfy_cast_weights` set (or weight/bias functions
    present), each call runs on copies of its parameters moved to the first tensor argument's device and dtype."""

    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []

    def forward(self, *args, **kwargs):
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(*args, **kwargs)
        x = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        own = dict(self._parameters)
        try:
            for name, param in own.items():
                if param is not None:
                    self._parameters[name] = self._cast(name, param, x)
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(own)

    def _cast(self, name: str, param: Tensor, x: Tensor) -> Tensor:
        value = param.to(x.device, x.dtype if param.is_floating_point() else param.dtype)
        for fn in {"weight": self.weight_function, "bias": self.bias_function}.get(name, ()):
            value = fn(value)
        return value


@lru_cache(maxsize=None)
def casting_class(cls: type) -> type:
    """`cls` with the CastParameters protocol (one class per wrapped type)."""
    return type(f"Cast{cls.__name__}", (CastParameters, cls), {"__module__": __name__})


def casting_ops(always_cast: bool = False) -> SimpleNamespace:
    """drm_core's own ops namespace for use_casting_layers (no host needed): CastParameters layers that cast
    when a host asks, or on every call with always_cast (weights stored in another dtype, e.g. fp8)."""
    def layer(name: str) -> type:
        cls = casting_class(getattr(nn, name))
        return type(f"Always{cls.__name__}", (cls,), {"comfy_cast_weights": True}) if always_cast else cls
    return SimpleNamespace(**{name: layer(name) for name in HOST_LAYERS})


def use_casting_layers(module: nn.Module, ops) -> nn.Module:
    """Swap module's plain Linear/Conv2d/GroupNorm/LayerNorm for `ops`' classes and give other parameter-holding
    leaves CastParameters, in place. `ops` is a namespace of torch-layer subclasses (e.g. comfy.ops.manual_cast)."""
    for name in HOST_LAYERS:
        replacement = getattr(ops, name)
        if not issubclass(replacement, getattr(nn, name)):
            raise TypeError(f"use_casting_layers: ops.{name} must subclass torch.nn.{name}, got {replacement}")
    for m in module.modules():
        cls = type(m)
        host = next((getattr(ops, n) for n in HOST_LAYERS if cls is getattr(nn, n)), None)
        if host is not None:
            m.__class__ = host
        elif (next(m.parameters(recurse=False), None) is not None and next(m.children(), None) is None
              and not hasattr(m, "comfy_cast_weights")):
            m.__class__ = casting_class(cls)
    return module


def store_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Keep the weight matrices of Linear and Conv2d layers in `dtype` (e.g. torch.float8_e4m3fn), in place;
    the layers must cast on use (use_casting_layers with a manual-cast ops namespace)."""
    for m in module.modules():
        if isinstance(m, STORED_LAYERS):
            if not getattr(m, "comfy_cast_weights", False):
                raise TypeError(f"store_weights: {type(m).__name__} does not cast its weights on use; call "
                                "use_casting_layers with a manual-cast ops namespace first")
            m.weight.data = m.weight.data.to(dtype)
    return module
