import json

import pytest
import torch
from safetensors.torch import save_file

from drm_core import DRMError, drm_from_base, load_drm, read_backbone_config, save_drm
from drm_core.keys import to_stability
from tiny import TINY_HEAD, conditioning, tiny_transformer
from training.bench import SD35_MEDIUM


def write_layouts(tmp_path):
    """The same tiny SD3.5-M-shaped MMDiT in every layout users have."""
    model = tiny_transformer()
    sd = model.state_dict()
    full = read_backbone_config(sd, blocks=4)[2]
    stability = to_stability(sd, full)
    extras = {"text_encoders.clip_l.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
              "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3)}
    paths = {"comfy_single_file": tmp_path / "sd3.5_medium_tiny.safetensors",
             "stability_bare": tmp_path / "mmdit.safetensors",
             "diffusers_folder": tmp_path / "transformer"}
    save_file({**{f"model.diffusion_model.{k}": v for k, v in stability.items()}, **extras},
              paths["comfy_single_file"])
    save_file(stability, paths["stability_bare"])
    model.save_pretrained(paths["diffusers_folder"])
    paths["diffusers_file"] = paths["diffusers_folder"] / "diffusion_pytorch_model.safetensors"
    return model, paths


def test_every_layout_builds_the_same_drm(tmp_path):
    _, paths = write_layouts(tmp_path)
    x = torch.randn(2, 16, 8, 8)
    ctx, pooled = conditioning(2)
    scores, states = {}, {}
    for name, path in paths.items():
        torch.manual_seed(0)  # same head init
        drm = drm_from_base(path, blocks=3, **TINY_HEAD)
        assert drm.config.backbone.blocks == 3 and drm.config.backbone.dual_attention_layers == (0, 1)
        scores[name] = drm.score(x, 0.5, ctx, pooled)
        states[name] = drm.state_dict()
    ref = states["diffusers_folder"]
    for name in paths:
        assert states[name].keys() == ref.keys()
        for k in ref:
            assert torch.equal(states[name][k], ref[k]), (name, k)
        torch.testing.assert_close(scores[name], scores["diffusers_folder"], rtol=0, atol=0)


def test_all_blocks_reproduce_the_diffusers_transformer_output(tmp_path):
    """With every block kept, the DRM's pre-head map is the MMDiT's own output (checks the whole key map)."""
    model, paths = write_layouts(tmp_path)
    drm = drm_from_base(paths["comfy_single_file"], blocks=4, **TINY_HEAD)
    x, (ctx, pooled) = torch.randn(2, 16, 8, 8), conditioning(2)
    sigma = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                         timestep=sigma * 1000).sample
        got = drm.features(x, sigma, ctx, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_full_size_sd35_medium_shapes_without_allocating():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        sd = SD3Transformer2DModel(**SD35_MEDIUM).state_dict()
    _, layout, cfg = read_backbone_config(sd)
    assert (cfg.depth, cfg.blocks, cfg.hidden, cfg.heads, cfg.patch_size) == (24, 21, 1536, 24, 2)
    assert cfg.dual_attention_layers == tuple(range(13)) and cfg.qk_norm == "rms_norm"
    assert cfg.pos_embed_max_size == 384 and cfg.context_dim == 4096 and cfg.pooled_dim == 2048
    full = read_backbone_config(sd, blocks=24)[2]
    stab = {f"model.diffusion_model.{k}": v for k, v in to_stability(sd, full).items()}
    drm = drm_from_base(stab)  # meta tensors in, meta tensors out: nothing is allocated
    assert all(p.is_meta for p in drm.parameters())
    assert len(drm.transformer_blocks) == 21
    backbone = sum(p.numel() for n, p in drm.named_parameters() if not n.startswith("head."))
    head = sum(p.numel() for n, p in drm.named_parameters() if n.startswith("head."))
    assert 1.8e9 < backbone < 2.3e9 and 3.5e6 < head < 4.1e6  # official head is ~3.8 M parameters


def test_save_load_roundtrip_scores_identically(tmp_path):
    _, paths = write_layouts(tmp_path)
    drm = drm_from_base(paths["diffusers_file"], blocks=2, **TINY_HEAD)
    path = save_drm(drm, tmp_path / "drm.safetensors", {"steps": 7})
    loaded = load_drm(path)
    x, (ctx, pooled) = torch.randn(3, 16, 8, 8), conditioning(1)
    torch.testing.assert_close(loaded.score(x, 0.25, ctx, pooled), drm.score(x, 0.25, ctx, pooled), rtol=0, atol=0)
    assert loaded.provenance["steps"] == 7 and loaded.provenance["base_layout"] == "diffusers"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_batched_scores_equal_one_by_one(tmp_path):
    _, paths = write_layouts(tmp_path)
    drm = drm_from_base(paths["stability_bare"], blocks=3, **TINY_HEAD)
    x, (ctx, pooled) = torch.randn(5, 16, 8, 8), conditioning(5)
    sigma = torch.linspace(0, 1, 5)
    with torch.no_grad():
        batched = drm.score(x, sigma, ctx, pooled)
        single = torch.cat([drm.score(x[i:i + 1], sigma[i], ctx[i:i + 1], pooled[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_truncated_file_is_named(tmp_path):
    _, paths = write_layouts(tmp_path)
    data = paths["stability_bare"].read_bytes()
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DRMError, match="broken.safetensors"):
        drm_from_base(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(DRMError, match="garbage.safetensors.*truncated or corrupt"):
        drm_from_base(garbage)


def test_sdxl_shaped_state_dict_is_refused(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, path)
    with pytest.raises(DRMError, match="sdxl.safetensors.*UNet.*SDXL"):
        drm_from_base(path)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(DRMError, match="model.ckpt.*only .safetensors"):
        drm_from_base(path)


def test_wrong_format_version_and_missing_tensor(tmp_path):
    _, paths = write_layouts(tmp_path)
    drm = drm_from_base(paths["stability_bare"], blocks=1, **TINY_HEAD)
    path = save_drm(drm, tmp_path / "drm.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header, tensors = json.loads(f.metadata()["drm"]), {k: f.get_tensor(k) for k in f.keys()}
    future = tmp_path / "future.safetensors"
    save_file(tensors, future, {"drm": json.dumps({**header, "format_version": 99})})
    with pytest.raises(DRMError, match="future.safetensors.*format_version 99"):
        load_drm(future)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("head.mlp")}, partial, {"drm": json.dumps(header)})
    with pytest.raises(DRMError, match="partial.safetensors.*missing.*head.mlp"):
        load_drm(partial)
    with pytest.raises(DRMError, match="not a DRM checkpoint"):
        load_drm(paths["stability_bare"])


@pytest.mark.parametrize("latents, sigma, match", [
    (torch.zeros(2, 4, 8, 8), 0.5, "4 channels is an SD1.x/SDXL latent"),
    (torch.zeros(2, 16, 7, 8), 0.5, "divisible by patch size"),
    (torch.zeros(2, 16, 8, 8), 1.5, "sigma must lie in \\[0, 1\\]"),
    (torch.zeros(2, 16, 8, 8), torch.tensor([0.1, 0.2, 0.3]), "shape \\[B\\]=2"),
])
def test_bad_score_inputs_are_named(tmp_path, latents, sigma, match):
    _, paths = write_layouts(tmp_path)
    drm = drm_from_base(paths["stability_bare"], blocks=1, **TINY_HEAD)
    ctx, pooled = conditioning(1)
    with pytest.raises(DRMError, match=match):
        drm.score(latents, sigma, ctx, pooled)
    with pytest.raises(DRMError, match="pooled"):
        drm.score(torch.zeros(2, 16, 8, 8), 0.5, ctx, torch.zeros(2, 768))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from tiny import tiny_transformer

    drm = drm_from_base(tiny_transformer().state_dict(), blocks=3, **TINY_HEAD).train()
    x, (ctx, pooled), sigma = torch.randn(2, 16, 8, 8), conditioning(2), torch.tensor([0.2, 0.7])
    grads = []
    for flag in (False, True):
        drm.gradient_checkpointing = flag
        drm.zero_grad()
        drm(x, sigma, ctx, pooled).sum().backward()
        grads.append({n: p.grad.clone() for n, p in drm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_prompt_embedded_once_scores_like_score(tmp_path):
    """embed_prompt + score_embedded (the prompt work done once per run) equals score, per candidate row."""
    from tiny import tiny_transformer

    drm = drm_from_base(tiny_transformer().state_dict(), blocks=3, **TINY_HEAD)
    ctx, pooled = conditioning(2)
    x = torch.randn(6, 16, 8, 8)  # 2 images x k = 3 candidates, image-major
    with torch.no_grad():
        direct = drm.score(x, 0.4, ctx.repeat_interleave(3, 0), pooled.repeat_interleave(3, 0))
        cached = drm.score_embedded(x, 0.4, drm.embed_prompt(ctx, pooled))
        one = drm.score_embedded(x[:1], 0.4, drm.embed_prompt(ctx[:1], pooled[:1]))
    torch.testing.assert_close(cached, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one, direct[:1], rtol=1e-6, atol=1e-6)
    with pytest.raises(DRMError, match="cannot serve a batch of 5"):
        drm.score_embedded(x[:5], 0.4, drm.embed_prompt(ctx, pooled))
