"""Casting layers (drm_core.casting): what ComfyUI's low-VRAM loading and fp8 storage rely on, without ComfyUI."""

import pytest
import torch

from drm_core import drm_from_base
from drm_core.casting import CastParameters, casting_ops, store_weights, use_casting_layers
from tiny import TINY_HEAD, conditioning, tiny_transformer


def tiny_drm(kind: str = "drm-conv"):
    head = TINY_HEAD if kind == "drm-conv" else dict(kind="dina-lrm", visual_taps=(1, 3), text_taps=(1, 3),
                                                     attn_heads=2)
    drm = drm_from_base(tiny_transformer().state_dict(), blocks=3, **head).eval()
    with torch.no_grad():
        for p in drm.head.parameters():  # a head away from its init, so every path matters
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return drm


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 16, 8, 8, generator=g), *conditioning(batch)


@pytest.mark.parametrize("kind", ["drm-conv", "dina-lrm"])
def test_casting_layers_change_nothing_until_asked(kind):
    drm = tiny_drm(kind)
    latents, context, pooled = inputs()
    with torch.inference_mode():
        before = drm.score(latents, 0.3, context, pooled)
        keys = list(drm.state_dict())
        use_casting_layers(drm, casting_ops())
        after = drm.score(latents, 0.3, context, pooled)
    assert list(drm.state_dict()) == keys
    leaves = [m for m in drm.modules() if next(m.parameters(recurse=False), None) is not None and not list(m.children())]
    assert leaves and all(isinstance(m, CastParameters) for m in leaves)
    assert torch.equal(before, after)


@pytest.mark.parametrize("kind", ["drm-conv", "dina-lrm"])
def test_layers_cast_on_demand_score_exactly_like_loaded_ones(kind):
    """The host's partial load: it marks the layers it left off the device; their weights are copied per call."""
    drm = tiny_drm(kind)
    latents, context, pooled = inputs()
    with torch.inference_mode():
        full = drm.score(latents, 0.5, context, pooled)
        use_casting_layers(drm, casting_ops())
        layers = [m for m in drm.modules() if isinstance(m, CastParameters)]
        for m in layers[::2]:
            m.comfy_cast_weights = True
        calls = []
        layers[0].weight_function = [lambda w: calls.append(1) or w]
        partial = drm.score(latents, 0.5, context, pooled)
    assert calls and torch.equal(full, partial)


def test_fp8_weights_score_close_to_fp32_and_keep_the_ranking():
    drm = tiny_drm()
    latents, context, pooled = inputs(32)
    with torch.inference_mode():
        reference = drm.score(latents, 0.2, context, pooled)
        use_casting_layers(drm, casting_ops(always_cast=True))
        store_weights(drm, torch.float8_e4m3fn)
        drm.compute_dtype = torch.float32
        fp8 = drm.score(latents, 0.2, context, pooled)
    matrices = [m.weight for m in drm.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert matrices and all(w.dtype == torch.float8_e4m3fn for w in matrices)
    assert fp8.dtype == torch.float32
    assert torch.corrcoef(torch.stack([reference, fp8]))[0, 1] > 0.99
    pairs = torch.triu_indices(32, 32, 1)
    same_order = (reference[pairs[0]] > reference[pairs[1]]) == (fp8[pairs[0]] > fp8[pairs[1]])
    assert same_order.float().mean() > 0.9


def test_fp8_needs_layers_that_cast():
    with pytest.raises(TypeError, match="use_casting_layers"):
        store_weights(tiny_drm(), torch.float8_e4m3fn)
