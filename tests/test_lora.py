import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.cli import main
from training.lora import add_lora, export_lora, lora_state, verify_lora
from test_cache import clip_tokenizer, t5_tokenizer, text_models, tiny_vae
from tiny import conditioning, tiny_transformer


def trained_lora_model():
    model = add_lora(tiny_transformer(), rank=4, alpha=8.0)  # PEFT scale 2.0
    with torch.no_grad():  # stand-in for training: make lora_B non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def tiny_pipeline():
    """A whole StableDiffusion3Pipeline of tiny parts, so the public `load_lora_weights` runs as users call it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_l, clip_g, t5 = text_models()
    return StableDiffusion3Pipeline(transformer=tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(), text_encoder=clip_l, tokenizer=clip_tokenizer(),
                                    text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(), text_encoder_3=t5,
                                    tokenizer_3=t5_tokenizer())


def mmdit_out(model):
    x, (ctx, pooled) = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), conditioning(2)
    with torch.no_grad():
        return model(x, ctx, pooled, torch.tensor([300.0, 800.0])).sample  # [2, 16, 8, 8]


def peft_style_file(model, path, **header):
    """What PEFT / diffusers' save_lora_weights write: lora_A/B as trained, no `.alpha` tensors."""
    save_file({f"transformer.{k}": v for k, v in lora_state(model).items()}, path,
              {k: json.dumps(v) for k, v in header.items()} or None)
    return path


def test_lora_covers_both_streams_and_attn2():
    names = set(lora_state(trained_lora_model()))
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_v",
                   "transformer_blocks.3.attn.to_out.0"):
        assert f"{module}.lora_A.weight" in names, module
    assert not any("transformer_blocks.3.attn.to_add_out" in n for n in names)  # last block is context-pre-only


def test_exported_lora_loads_through_diffusers_public_loader_at_the_trained_strength(tmp_path):
    model = trained_lora_model()
    path = export_lora(model, tmp_path / "lora.safetensors", {"iteration": 3})
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("transformer.") and ".lora_" in k for k in f.keys())  # no `.alpha` tensors
        header = f.metadata()
    adapter, record = json.loads(header["lora_adapter_metadata"]), json.loads(header["drm_lora"])
    assert adapter["transformer.r"] == adapter["transformer.lora_alpha"] == 4
    assert record == {"iteration": 3, "rank": 4, "alpha": 8.0, "trained_scale": 2.0, "scale_folded": True}
    pipe = tiny_pipeline()
    plain = mmdit_out(pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name="drm")
    expected = mmdit_out(model)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(mmdit_out(pipe.transformer), expected, rtol=1e-5, atol=1e-5)
    pipe.set_adapters("drm", adapter_weights=0.5)  # strength 0.5 is half the trained scale, as in PEFT
    model.set_adapters(["default"], weights=[0.5])
    torch.testing.assert_close(mmdit_out(pipe.transformer), mmdit_out(model), rtol=1e-5, atol=1e-5)


def test_verify_passes_our_file_and_reports_both_loaders(tmp_path, capsys):
    ours = export_lora(trained_lora_model(), tmp_path / "ours.safetensors")
    base = tmp_path / "base"
    tiny_transformer().save_pretrained(base)
    result = verify_lora(ours, base)
    assert result["problems"] == [] and result["notes"] == [] and result["expected_scale"] == 1.0
    assert {(e["comfyui_scale"], e["diffusers_scale"]) for e in result["entries"]} == {(1.0, 1.0)}
    assert main(["verify-lora", str(ours), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI [1.0], diffusers [1.0], expected 1 (drm_lora: rank 4, alpha 8, scale folded" in out


def test_verify_flags_alpha_tensors_that_diffusers_refuses(tmp_path):
    model = trained_lora_model()
    tensors = {f"transformer.{k}": v for k, v in lora_state(model).items()}
    tensors |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in list(tensors) if "lora_A" in k}
    old = tmp_path / "alpha.safetensors"  # this pack's previous format: ComfyUI right, diffusers refuses it
    save_file(tensors, old, {"drm_lora": json.dumps({"rank": 4, "alpha": 8.0})})
    result = verify_lora(old)
    assert {e["comfyui_scale"] for e in result["entries"]} == {2.0} == {result["expected_scale"]}
    assert {e["diffusers_scale"] for e in result["entries"]} == {None}
    assert len(result["problems"]) == 1
    assert "diffusers' load_lora_weights refuses this file" in result["problems"][0]
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # what verify predicts, by diffusers itself
        tiny_pipeline().load_lora_weights(str(old))


def test_verify_flags_peft_files_comfyui_loads_at_the_wrong_strength(tmp_path, capsys):
    model = trained_lora_model()
    adapter = {f"transformer.{k}": v for k, v in model.peft_config["default"].to_dict().items()
               if k in ("r", "lora_alpha", "target_modules")}
    adapter["transformer.target_modules"] = sorted(adapter["transformer.target_modules"])
    diffusers_file = peft_style_file(model, tmp_path / "diffusers.safetensors", lora_adapter_metadata=adapter)
    result = verify_lora(diffusers_file)
    assert {(e["comfyui_scale"], e["diffusers_scale"]) for e in result["entries"]} == {(1.0, 2.0)}
    assert any("load at 1 in ComfyUI and 2 in diffusers" in p for p in result["problems"])
    pipe = tiny_pipeline()  # diffusers really applies 2.0 (the trained scale): only ComfyUI is wrong
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(mmdit_out(pipe.transformer), mmdit_out(model), rtol=1e-5, atol=1e-5)
    assert main(["verify-lora", str(diffusers_file)]) == 1
    assert "in ComfyUI and 2 in diffusers" in capsys.readouterr().out

    recorded = peft_style_file(model, tmp_path / "recorded.safetensors", drm_lora={"rank": 4, "alpha": 8.0})
    problems = verify_lora(recorded)["problems"]  # both loaders agree on 1.0, the record says 2.0
    assert any("wrong strength in ComfyUI: scale 1, expected 2" in p for p in problems)
    assert any("wrong strength in diffusers: scale 1, expected 2" in p for p in problems)

    unknown = verify_lora(peft_style_file(model, tmp_path / "bare_peft.safetensors"))
    assert unknown["problems"] == [] and "no record of the trained scale" in unknown["notes"][0]


def test_verify_flags_keys_the_loaders_skip(tmp_path):
    model = trained_lora_model()
    bare = tmp_path / "bare.safetensors"
    save_file(lora_state(model), bare)
    problems = verify_lora(bare)["problems"]
    assert any("is not one ComfyUI maps" in p for p in problems)
    assert any("diffusers' load_lora_weights does not apply them" in p for p in problems)
    wrong_rank = peft_style_file(model, tmp_path / "rank.safetensors",
                                 lora_adapter_metadata={"transformer.r": 8, "transformer.lora_alpha": 8})
    assert any("metadata r = 8 but the tensors have rank 4" in p for p in verify_lora(wrong_rank)["problems"])
