"""import-rm: tiny DiNa-LRM- and official-DRM-shaped downloads built in-process, imported, checked exactly.

The references below are written independently of drm_core: the DiNa-LRM side runs a PEFT-wrapped
backbone (LoRA unmerged) and a functional head straight from the state dict; the official side uses
diffusers' own SD3 transformer (skip_layers drops the last block) and a functional conv head.
"""

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from drm_core import DRMError, add_noise, drm_from_base, flow_sigmas, load_drm, save_drm, stepwise_sample
from dina_fixture import write_tiny_dina
from tiny import conditioning, tiny_transformer
from training.cli import main as cli
from training.import_rm import import_dina_lrm

BLOCKS, TAPS, HEADS = 3, (1, 2, 3), 4  # tiny analogue of DiNa's 12 blocks tapped after 4, 8, 12 (dina_fixture)


class TapBackbone(nn.Module):
    """DiNa-style truncated backbone with the same module names; returns temb and the tapped tokens."""

    def __init__(self, transformer, blocks, taps):
        super().__init__()
        self.pos_embed, self.time_text_embed = transformer.pos_embed, transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:blocks])
        self.taps = taps

    def forward(self, x, timestep, context, pooled):
        h, temb, c = self.pos_embed(x), self.time_text_embed(timestep, pooled), self.context_embedder(context)
        image, text = [], []
        for i, block in enumerate(self.transformer_blocks):
            c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb)
            if i + 1 in self.taps:
                image.append(h)
                text.append(c)
        return temb, image, text


def reference_dina_head(sd, temb, image, text, heads):
    """DiNa-LRM's head, functionally, from the state dict."""
    def lin(x, k):
        return F.linear(x, sd[k + ".weight"], sd[k + ".bias"])

    def rms(x, k):
        return F.rms_norm(x, (x.shape[-1],), sd[k + ".weight"])

    def film(x, p):
        gamma, beta = lin(F.silu(lin(temb, p + "cond_mlp.0")), p + "cond_mlp.2")[:, None].chunk(2, dim=-1)
        return lin(x * (1 + gamma) + beta + sd[p + "layer_embed"], p + "proj")

    def mha(q, k, v):
        b, n, w = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, w // heads).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / (w // heads) ** 0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(b, n, w)

    def branch(q, ctx, p, kk, vk, gate):
        k, v = lin(ctx, p + kk), lin(ctx, p + vk)
        if gate:
            v = v * torch.sigmoid(lin(F.silu(lin(ctx, p + gate + ".0")), p + gate + ".2"))
        return mha(q, k, v)

    def cross(queries, vis, txt, p, gated):
        q = lin(rms(queries, p + "norm_q"), p + "to_q")
        h = branch(q, rms(vis, p + "norm_v"), p, "to_k_vis", "to_v_vis", "gate_vis" if gated else None)
        if txt is not None:
            h = h + branch(q, rms(txt, p + "norm_t"), p, "to_k_text", "to_v_text", "gate_text" if gated else None)
        return queries + lin(h, p + "to_out.0")

    v = lin(torch.cat([film(x, f"layer_adapters_visual.{i}.") for i, x in enumerate(image)], -1), "agg_visual")
    t = lin(torch.cat([film(x, f"layer_adapters_text.{i}.") for i, x in enumerate(text)], -1), "agg_text")
    q = sd["query_tokens"].expand(v.shape[0], -1, -1)
    q = cross(cross(q, v, t, "attn1.", True), v, None, "attn2.", False)
    q = q + lin(F.gelu(lin(rms(q, "norm_ff"), "ff.0")), "ff.2")
    return lin(q, "head").mean(1).squeeze(-1)


@pytest.fixture(scope="module")
def dina(tmp_path_factory):
    """A DiNa-LRM-shaped download (tests/dina_fixture.py) + its base; the reference backbone is PEFT's own
    model with that download's LoRA loaded by PEFT (so the files are what PEFT reads)."""
    tmp = tmp_path_factory.mktemp("dina")
    model = tiny_transformer()
    model.save_pretrained(tmp / "sd35m")  # the user's base checkpoint (diffusers folder)
    source = tmp / "DiNa-LRM-tiny"
    write_tiny_dina(source, tmp / "sd35m")
    settings = json.loads((source / "config.json").read_text())["model"]
    assert (settings["num_transformer_layers"], tuple(settings["visual_head_idx"])) == (BLOCKS, TAPS)
    assert settings["reward_head"]["num_attn_heads"] == HEADS
    backbone = PeftModel.from_pretrained(TapBackbone(copy.deepcopy(model), BLOCKS, TAPS),
                                         source / "checkpoint" / "backbone_lora")
    lora_b = [p for n, p in backbone.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 3 * 8 + 2 * 4 and all(p.abs().sum() > 0 for p in lora_b)  # PEFT loaded every pair
    head_sd = torch.load(source / "checkpoint" / "rm_head.pt", weights_only=True)
    out = tmp / "dina.safetensors"
    assert cli(["import-rm", "--kind", "dina-lrm", str(source), "--base", str(tmp / "sd35m"),
                "--out", str(out)]) == 0
    return dict(tmp=tmp, base=tmp / "sd35m", source=source, backbone=backbone.eval(), head=head_sd, out=out)


def dina_reference(dina, x, sigma, ctx, pooled):
    with torch.no_grad():
        temb, image, text = dina["backbone"](x, sigma * 1000, ctx, pooled)
        return reference_dina_head(dina["head"], temb, image, text, HEADS)


def test_dina_scores_equal_peft_backbone_and_head(dina):
    drm = load_drm(dina["out"])
    assert drm.config.head.kind == "dina-lrm" and drm.config.backbone.blocks == BLOCKS
    assert not hasattr(drm, "proj_out") and not hasattr(drm, "norm_out")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 8, 8, generator=g)
    ctx, pooled = conditioning(3, tokens=9)
    sigma = torch.tensor([0.25, 0.6, 1.0])
    noisy = add_noise(x0, torch.randn(x0.shape, generator=g), sigma)  # seeded, unlike upstream's scorer
    for latents, s in ((x0, torch.zeros(3)), (noisy, sigma)):
        expected = dina_reference(dina, latents, s, ctx, pooled)
        with torch.no_grad():
            batched = drm.score(latents, s, ctx, pooled)
            single = torch.cat([drm.score(latents[i:i + 1], s[i], ctx[i:i + 1], pooled[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-5)
    unmerged = drm_from_base(dina["base"], blocks=BLOCKS, kind="dina-lrm", visual_taps=TAPS, text_taps=TAPS,
                             attn_heads=HEADS)
    unmerged.head.load_state_dict(dina["head"])
    with torch.no_grad():  # the LoRA matters: without it the scores differ
        assert not torch.allclose(unmerged.score(noisy, sigma, ctx, pooled), drm.score(noisy, sigma, ctx, pooled),
                                  atol=1e-4)


def test_dina_metadata_roundtrip_stepwise_and_save_load(dina):
    with safe_open(str(dina["out"]), "pt") as f:
        header = json.loads(f.metadata()["drm"])
    assert header["head"]["kind"] == "dina-lrm" and header["head"]["visual_taps"] == list(TAPS)
    prov = header["provenance"]
    assert (prov["text_encoding"]["scheme"], prov["text_encoding"]["t5_max_length"]) == ("diffusers-sd3", 256)
    assert prov["score"]["normalisation"] == "none" and prov["imported_from"]["lora"]["modules"] == 3 * 8 + 2 * 4
    assert header["scoring"]["sigma"] == 0.1  # DiNa's recommendation, snapped to its timestep table when used
    assert header["scoring"]["sigma_table"] == {"kind": "flow-shift", "steps": 1000, "shift": 3.0}
    drm = load_drm(dina["out"])
    assert drm.scoring.recommended_sigma == pytest.approx(0.100746, abs=5e-7)
    ctx, pooled = conditioning(1, tokens=5)
    again = load_drm(save_drm(drm, dina["tmp"] / "again.safetensors"))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.score(x, 0.5, ctx, pooled), drm.score(x, 0.5, ctx, pooled), rtol=0, atol=0)
        res = stepwise_sample(lambda z, s: -z, lambda c, s: drm.score(c, s, ctx, pooled), torch.randn(2, 16, 8, 8),
                              flow_sigmas(3), k=2, generator=torch.Generator().manual_seed(0))
    assert res.latent.shape == (2, 16, 8, 8) and [r.branched for r in res.trace] == [True, True, False]
    assert drm.unused_parameter_names() == set()  # the text tap after the last block uses its context stream


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_malicious_head_pickle_is_refused(dina, tmp_path):
    source = tmp_path / "evil"
    (source / "checkpoint").mkdir(parents=True)
    for name in ("backbone_lora",):
        (source / "checkpoint" / name).symlink_to(dina["source"] / "checkpoint" / name)
    (source / "config.json").write_text((dina["source"] / "config.json").read_text())
    marker = tmp_path / "marker"
    torch.save({"attn1.to_q.weight": Evil(marker)}, source / "checkpoint" / "rm_head.pt")
    with pytest.raises(DRMError, match="rm_head.pt: refused"):
        import_dina_lrm(source, dina["base"])
    assert cli(["import-rm", "--kind", "dina-lrm", str(source), "--base", str(dina["base"]),
                "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()
    pickle.loads(pickle.dumps(Evil(tmp_path / "proof")))  # the payload is real: plain unpickling runs it
    assert (tmp_path / "proof").exists()


def test_head_and_lora_mismatches_are_named(dina, tmp_path):
    source = tmp_path / "bad"
    ckpt = source / "checkpoint"
    ckpt.mkdir(parents=True)
    (source / "config.json").write_text((dina["source"] / "config.json").read_text())
    (ckpt / "backbone_lora").symlink_to(dina["source"] / "checkpoint" / "backbone_lora")
    head = dict(dina["head"])
    head.pop("attn2.to_out.0.bias")
    head["extra.weight"] = torch.zeros(1)
    torch.save(head, ckpt / "rm_head.pt")
    with pytest.raises(DRMError, match=r"rm_head.pt.*missing \['attn2.to_out.0.bias'\].*unexpected \['extra.weight'\]"):
        import_dina_lrm(source, dina["base"])
    torch.save(dina["head"], ckpt / "rm_head.pt")
    (ckpt / "backbone_lora").unlink()
    lora = ckpt / "backbone_lora"
    lora.mkdir()
    published = dina["source"] / "checkpoint" / "backbone_lora"
    (lora / "adapter_config.json").write_text((published / "adapter_config.json").read_text())
    with safe_open(str(published / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dropped = "base_model.model.transformer_blocks.1.attn.to_k.lora_A.weight"
    tensors.pop(dropped)
    tensors["base_model.model.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, lora / "adapter_model.safetensors")
    with pytest.raises(DRMError, match=r"not in the backbone \['transformer_blocks.7.attn.to_q'\].*incomplete A/B "
                                       r"pairs \['transformer_blocks.1.attn.to_k'\]"):
        import_dina_lrm(source, dina["base"])


def test_import_checks_inputs_before_reading_weights(dina, tmp_path, monkeypatch):
    """Incomplete source, a base the LoRA does not fit, an unwritable --out: refused before any conversion."""
    import training.import_rm as import_rm

    converted, real = [], import_rm.convert
    monkeypatch.setattr(import_rm, "convert", lambda *a, **k: converted.append(a) or real(*a, **k))

    def run(source, base, out):
        return cli(["import-rm", "--kind", "dina-lrm", str(source), "--base", str(base), "--out", str(out)])

    partial = tmp_path / "partial"
    (partial / "checkpoint" / "backbone_lora").mkdir(parents=True)
    (partial / "config.json").write_text((dina["source"] / "config.json").read_text())
    (partial / "checkpoint" / "rm_head.pt").symlink_to(dina["source"] / "checkpoint" / "rm_head.pt")
    with pytest.raises(DRMError, match=r"partial: the DiNa-LRM download is incomplete: missing "
                                       r"checkpoint/backbone_lora/adapter_config.json, "
                                       r"checkpoint/backbone_lora/adapter_model.safetensors\. Download it again: "
                                       r"hf download liuhuohuo/DiNa-LRM-SD35M-12layers"):
        import_rm.check_complete(partial)
    assert run(partial, dina["base"], tmp_path / "a.safetensors") == 2
    other = tmp_path / "other_base"
    tiny_transformer(attention_head_dim=8).save_pretrained(other)  # hidden 16, not the LoRA's 32
    with pytest.raises(DRMError, match=r"LoRA shapes do not match the backbone.*Is other_base the SD3.5 Medium "
                                       r"checkpoint DiNa-LRM-tiny's LoRA was trained on"):
        import_rm.check_base(import_rm.check_complete(dina["source"]), other)
    assert run(dina["source"], other, tmp_path / "b.safetensors") == 2
    assert run(dina["source"], tmp_path / "no_such_base.safetensors", tmp_path / "c.safetensors") == 2
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DRMError, match="a_file is a file, not a folder"):
        import_rm.check_out(tmp_path / "a_file" / "d.safetensors")
    assert run(dina["source"], dina["base"], tmp_path / "a_file" / "d.safetensors") == 2
    assert converted == []
    assert run(dina["source"], dina["base"], tmp_path / "new" / "e.safetensors") == 0  # valid inputs do convert
    assert len(converted) == 1 and (tmp_path / "new" / "e.safetensors").is_file()


# ------------------------------------------------------------------------------------------- official DRM

def reference_conv_head(h, fmap):
    x = fmap
    for i in (1, 2, 3):
        x = F.conv2d(x, h[f"down{i}.0.weight"], h[f"down{i}.0.bias"], stride=2, padding=1)
        x = F.relu(F.group_norm(x, 32, h[f"down{i}.1.weight"], h[f"down{i}.1.bias"]))
    x = F.relu(F.linear(x.mean((2, 3)), h["mlp.0.weight"], h["mlp.0.bias"]))
    return F.linear(x, h["mlp.3.weight"], h["mlp.3.bias"]).squeeze(-1)


def test_official_layout_imports_and_scores_like_the_official_forward(tmp_path):
    model = tiny_transformer(seed=4)
    g = torch.Generator().manual_seed(5)
    head = {}
    for i, (c_in, c_out) in enumerate(((16, 32), (32, 64), (64, 64)), start=1):
        head[f"down{i}.0.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.2
        head[f"down{i}.0.bias"] = torch.randn(c_out, generator=g) * 0.1
        head[f"down{i}.1.weight"] = 1 + torch.randn(c_out, generator=g) * 0.1
        head[f"down{i}.1.bias"] = torch.randn(c_out, generator=g) * 0.1
    head.update({"mlp.0.weight": torch.randn(512, 64, generator=g) * 0.1, "mlp.0.bias": torch.randn(512, generator=g),
                 "mlp.3.weight": torch.randn(1, 512, generator=g) * 0.1, "mlp.3.bias": torch.randn(1, generator=g)})
    folder = tmp_path / "checkpoint-2000"
    folder.mkdir()
    save_file({**{f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()},
               **{f"reward_output.{k}": v for k, v in head.items()}}, folder / "model.safetensors")
    out = tmp_path / "drm_official.safetensors"
    with pytest.raises(DRMError, match="neither SD3.5-M nor SD3.5-L; pass --blocks"):
        from training.import_rm import import_drm_official
        import_drm_official(folder)
    assert cli(["import-rm", "--kind", "drm-official", str(folder), "--blocks", "3", "--out", str(out)]) == 0
    drm = load_drm(out)
    assert drm.config.head.kind == "drm-conv" and drm.config.head.conv_channels == (32, 64, 64)
    assert drm.provenance["text_encoding"]["t5_max_length"] == 512
    assert drm.provenance["imported_from"]["unused_blocks_not_copied"] == [3]
    x0 = torch.randn(3, 16, 8, 8, generator=g)
    ctx, pooled = conditioning(3, tokens=6)
    sigma = torch.tensor([0.0, 0.5, 0.9])
    x = add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.no_grad():
        fmap = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma * 1000,
                     skip_layers=[3]).sample  # blocks 0..2, then the DiT's own norm_out/proj_out
        expected = reference_conv_head(head, fmap)
        batched = drm.score(x, sigma, ctx, pooled)
        single = torch.cat([drm.score(x[i:i + 1], sigma[i], ctx[i:i + 1], pooled[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-5)


def test_official_pickles_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"never read")
    assert cli(["import-rm", "--kind", "drm-official", str(tmp_path / "model.pt"), "--out",
                str(tmp_path / "o.safetensors")]) == 2
    save_file({"transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    from training.import_rm import import_drm_official
    with pytest.raises(DRMError, match="not an official DRM checkpoint"):
        import_drm_official(tmp_path)


def test_header_without_kind_is_the_conv_head(tmp_path):
    model = tiny_transformer()
    drm = drm_from_base(model.state_dict(), blocks=2, conv_channels=(16, 16), groups=4, mlp_hidden=8, dropout=0.0)
    path = save_drm(drm, tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as f:
        header, tensors = json.loads(f.metadata()["drm"]), {k: f.get_tensor(k) for k in f.keys()}
    assert header["head"].pop("kind") == "drm-conv"
    save_file(tensors, tmp_path / "old.safetensors", {"drm": json.dumps(header)})
    old = load_drm(tmp_path / "old.safetensors")
    assert old.config.head == drm.config.head


def test_full_size_dina_lrm_shapes_without_allocating():
    from diffusers import SD3Transformer2DModel

    from training.bench import SD35_MEDIUM

    with torch.device("meta"):
        sd = SD3Transformer2DModel(**SD35_MEDIUM).state_dict()
    drm = drm_from_base(sd, blocks=12, kind="dina-lrm")  # DiNa-LRM-SD35M-12layers defaults: taps 4/8/12
    assert all(p.is_meta for p in drm.parameters()) and len(drm.transformer_blocks) == 12
    head = dict(drm.head.named_parameters())
    assert head["query_tokens"].shape == (1, 4, 1536) and head["layer_adapters_visual.0.proj.weight"].shape == (384, 1536)
    assert head["agg_text.weight"].shape == (1536, 3 * 384) and "layer_adapters_text.2.proj_in.weight" not in head
    backbone = sum(p.numel() for n, p in drm.named_parameters() if not n.startswith("head."))
    assert 1.2e9 < backbone < 1.25e9 and 135e6 < sum(p.numel() for p in head.values()) < 145e6  # 1.23 B + 139 M
