import torch
from safetensors.torch import save_file

from training.cli import main
from training.lora import add_lora, export_lora, lora_state, verify_lora
from tiny import conditioning, tiny_transformer


def trained_lora_model():
    model = add_lora(tiny_transformer(), rank=4, alpha=8.0)
    with torch.no_grad():  # stand-in for training: make lora_B non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def test_lora_covers_both_streams_and_attn2():
    names = set(lora_state(trained_lora_model()))
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_v",
                   "transformer_blocks.3.attn.to_out.0"):
        assert f"{module}.lora_A.weight" in names, module
    assert not any("transformer_blocks.3.attn.to_add_out" in n for n in names)  # last block is context-pre-only


def test_exported_lora_loads_in_diffusers_at_the_trained_strength(tmp_path):
    model = trained_lora_model()
    path = export_lora(model, tmp_path / "lora.safetensors")
    x, (ctx, pooled) = torch.randn(2, 16, 8, 8), conditioning(2)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        expected = model(x, ctx, pooled, t).sample
        from diffusers import StableDiffusion3Pipeline

        # exactly what `pipe.load_lora_weights(path)` does for the transformer
        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        fresh = tiny_transformer()
        StableDiffusion3Pipeline.load_lora_into_transformer(state, fresh, metadata=metadata)
        got = fresh(x, ctx, pooled, t).sample
        plain = tiny_transformer()(x, ctx, pooled, t).sample
    assert (expected - plain).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_verify_accepts_our_file_and_flags_peft_files_without_alpha(tmp_path, capsys):
    model = trained_lora_model()
    ours = export_lora(model, tmp_path / "ours.safetensors")
    base = tmp_path / "base"
    tiny_transformer().save_pretrained(base)
    result = verify_lora(ours, base)
    assert result["problems"] == [] and {e["comfyui_scale"] for e in result["entries"]} == {2.0}
    peft_style = tmp_path / "peft.safetensors"
    save_file({f"transformer.{k}": v for k, v in lora_state(model).items()}, peft_style)
    flagged = verify_lora(peft_style)
    assert flagged["problems"] and all("no '.alpha' tensor" in p for p in flagged["problems"])
    bare = tmp_path / "bare.safetensors"
    save_file(lora_state(model), bare)
    assert any("is not one ComfyUI maps" in p for p in verify_lora(bare)["problems"])
    assert main(["verify-lora", str(ours), "--base", str(base)]) == 0
    assert main(["verify-lora", str(peft_style)]) == 1
    assert "ComfyUI applies scale 1.0" in capsys.readouterr().out
