"""SD3 component files in ComfyUI's layouts: text encoders, VAE and tokenizers, equal to the diffusers layout."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from drm_core import DRMError, load_drm, read_backbone_config
from drm_core.keys import to_stability
from training import encoders as encoders_module
from training.cache_format import PreferenceCache
from training.cli import main
from training.encoders import SD3TextEncoder, SD3VAEEncoder, clip_scheme
from training.sd3_files import (COMFY_CLIP_TOKENIZER, COMFY_T5_TOKENIZER, comfyui_roots, find_tokenizers,
                                load_sd3_vae, open_text_encoders, open_vae)
from test_cache import RES, WORDS, write_dataset
from tiny import tiny_transformer

PROMPTS = ["a cat on the mat", "", "a (red:1.3) car on the road at night", " ".join(["big dog"] * 50)]
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest float8_e4m3fn


# ----------------------------------------------------------------------------- tiny tokenizers (real formats)

def write_clip_tokenizer(folder: Path) -> None:
    """A tiny byte-pair CLIP tokenizer in ComfyUI's sd1_tokenizer format (vocab.json + merges.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"!": 0}
    merges: list[str] = []
    for ch in "()!:,.":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))


def write_t5_tokenizer(folder: Path) -> None:
    """A tiny unigram T5 tokenizer in ComfyUI's t5_tokenizer format (tokenizer.json): <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in "():"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="\u2581", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(**metaspace)])
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "extra_ids": 0}))


def write_comfyui_tokenizers(root: Path) -> Path:
    write_clip_tokenizer(root / COMFY_CLIP_TOKENIZER)
    write_t5_tokenizer(root / COMFY_T5_TOKENIZER)
    return root


# ----------------------------------------------------------------------------- tiny models

CLIP_VOCAB, T5_VOCAB = 80, 40


def text_models():
    """CLIP-L 64 wide (1 head of 64), CLIP-G 128 wide (2 heads, projection 2048 - 64), T5 4096 wide (2 heads of 64);
    weights rounded to float16 so the fp16 files hold them exactly."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    common = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=77, bos_token_id=CLIP_VOCAB - 2,
                  eos_token_id=CLIP_VOCAB - 1, pad_token_id=1)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, num_attention_heads=1, intermediate_size=96,
                                                        num_hidden_layers=2, projection_dim=64,
                                                        hidden_act="quick_gelu", **common))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=128, num_attention_heads=2, intermediate_size=160,
                                                        num_hidden_layers=3, projection_dim=2048 - 64,
                                                        hidden_act="gelu", **common))
    t5 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=4096, d_kv=64, num_heads=2, d_ff=16, num_layers=2,
                                 feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        for model in (clip_l, clip_g, t5):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.01 if model is t5 else 0.05)).copy_(p.half().float())
    return [m.eval() for m in (clip_l, clip_g, t5)]


def is_linear(key: str, tensor: torch.Tensor) -> bool:
    """Linear weights (what fp8 files store in fp8): 2-D weights that are no embedding."""
    return tensor.ndim == 2 and key.endswith(".weight") and not re.search(r"embed|shared|relative_attention_bias", key)


def comfy_state(model, precision: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers text model as ComfyUI's files hold it: fp16, fp8 (Linear weights fp8_e4m3fn) or scaled fp8
    (fp8 weight / scale, `scale_weight` per Linear, `scaled_fp8` marker, a few `scale_input`)."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; ComfyUI's T5 files hold shared.weight
        if precision != "fp16" and is_linear(key, tensor):
            if precision == "fp8":
                out[prefix + key] = tensor.to(FP8)
            else:
                scale = tensor.abs().max().float() / FP8_MAX
                out[prefix + key] = (tensor.float() / scale).to(FP8)
                out[prefix + key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
                if key.endswith("q.weight") or key.endswith("q_proj.weight"):
                    out[prefix + key.removesuffix("weight") + "scale_input"] = torch.ones(())
        else:
            out[prefix + key] = tensor.half()
    if precision == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def dequantised(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What ComfyUI computes with: fp8 weights cast up, times scale_weight where present."""
    out = {}
    for key, tensor in state.items():
        if not key.startswith(prefix) or key.endswith(("scale_weight", "scale_input", "scaled_fp8")):
            continue
        scale = state.get(key.removesuffix("weight") + "scale_weight")
        out[key[len(prefix):]] = tensor.float() * scale if scale is not None else tensor.float()
    return out


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                        sample_size=RES, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> LDM/Stability names (a hand map, independent of the loader's)."""
    n = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("conv_norm_out", "norm_out").replace("group_norm", "norm").replace("to_out.0", "proj_out")
        k = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", k)
        if "attn_1." in k and k.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[k] = tensor
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fake ComfyUI install (tokenizers, models/text_encoders, models/vae, a single-file checkpoint) and a
    diffusers SD3 folder holding the same weights, in separate trees."""
    root = write_comfyui_tokenizers(tmp_path_factory.mktemp("ComfyUI"))
    models = text_models()
    clip_l, clip_g, t5 = models
    te = root / "models" / "text_encoders"
    te.mkdir(parents=True)
    l_state = comfy_state(clip_l, "fp16")
    l_state.pop("text_projection.weight")  # CLIP-L's projection is unused by SD3: tolerate files without it
    l_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers saved it
    save_file(l_state, te / "clip_l.safetensors")
    save_file({f"transformer.{k}": v for k, v in comfy_state(clip_g, "fp16").items()}, te / "clip_g.safetensors")
    t5_states = {p: comfy_state(t5, p) for p in ("fp16", "fp8", "fp8_scaled")}
    for precision, name in (("fp16", "t5xxl_fp16"), ("fp8", "t5xxl_fp8_e4m3fn"),
                            ("fp8_scaled", "t5xxl_fp8_e4m3fn_scaled")):
        save_file(t5_states[precision], te / f"{name}.safetensors")
    vae = tiny_vae()
    (root / "models" / "vae").mkdir()
    save_file(ldm_vae_state(vae), root / "models" / "vae" / "sd3_vae.safetensors")
    save_file(vae.state_dict(), root / "models" / "vae" / "sd3_vae_diffusers_names.safetensors")
    mmdit = tiny_transformer().state_dict()
    single = {f"model.diffusion_model.{k}": v for k, v in
              to_stability(mmdit, read_backbone_config(mmdit, blocks=4)[2]).items()}
    single.update({f"first_stage_model.{k}": v for k, v in ldm_vae_state(vae).items()})
    single.update(comfy_state(clip_l, "fp16", "text_encoders.clip_l.transformer."))
    single.update(comfy_state(clip_g, "fp16", "text_encoders.clip_g.transformer."))
    single.update(comfy_state(t5, "fp8_scaled", "text_encoders.t5xxl.transformer."))
    (root / "models" / "checkpoints").mkdir()
    checkpoint = root / "models" / "checkpoints" / "sd3.5_tiny_incl_clips_t5xxlfp8scaled.safetensors"
    save_file(single, checkpoint)

    diffusers = tmp_path_factory.mktemp("diffusers_sd3")
    for sub, model in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), models):
        model.save_pretrained(diffusers / sub)
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(diffusers / sub)
    write_t5_tokenizer(diffusers / "tokenizer_3")
    vae.save_pretrained(diffusers / "vae")
    return {"root": root, "te": te, "checkpoint": checkpoint, "diffusers": diffusers, "models": models, "vae": vae,
            "t5_states": t5_states}


@pytest.fixture(scope="module")
def reference(world: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of PROMPTS by the diffusers folder (today's layout)."""
    return encode(world["diffusers"])


@pytest.fixture
def no_comfyui_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


def encode(path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return SD3TextEncoder.from_pretrained(path, **kwargs).encode(PROMPTS)


# ----------------------------------------------------------------------------- text encoders

def test_comfyui_text_encoder_folder_equals_diffusers_folder(world: dict, reference: tuple, no_comfyui_env: None,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="training.sd3_files"):
        files = open_text_encoders(world["te"])  # tokenizers: found in the ComfyUI install above the folder
    described = files.describe()
    assert described["clip_l"].startswith(str(world["te"] / "clip_l.safetensors"))
    assert described["clip_g"] == f"{world['te'] / 'clip_g.safetensors'} under 'transformer.' (float16)"
    assert described["t5xxl"] == f"{world['te'] / 't5xxl_fp16.safetensors'} (float16)"  # highest precision wins
    assert described["tokenizers"] == f"ComfyUI {world['root']}"
    assert "t5xxl_fp8_e4m3fn_scaled.safetensors (fp8_e4m3fn scaled)" in caplog.text and "not used" in caplog.text
    ours = SD3TextEncoder.from_files(files).encode(PROMPTS)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)  # fp16 weights in both layouts: bit-identical encodings
    assert ours[0].shape == (len(PROMPTS), 154, 4096) and ours[0][0, 77:].abs().sum() > 0


def test_architecture_comes_from_the_shapes(world: dict, tmp_path: Path) -> None:
    clip_l, clip_g, t5 = (m.config for m in open_text_encoders(world["te"], tokenizers=world["root"]).models)
    assert (clip_l.hidden_size, clip_l.num_attention_heads, clip_l.num_hidden_layers, clip_l.intermediate_size,
            clip_l.hidden_act, clip_l.vocab_size) == (64, 1, 2, 96, "quick_gelu", CLIP_VOCAB)
    assert (clip_g.hidden_size, clip_g.num_attention_heads, clip_g.num_hidden_layers, clip_g.intermediate_size,
            clip_g.hidden_act, clip_g.projection_dim) == (128, 2, 3, 160, "gelu", 1984)
    assert (t5.d_model, t5.num_heads, t5.d_kv, t5.d_ff, t5.num_layers, t5.vocab_size,
            t5.dense_act_fn, t5.is_gated_act) == (4096, 2, 64, 16, 2, T5_VOCAB, "gelu_new", True)
    # old ComfyUI CLIPSave files: a transposed `text_projection` (no .weight), plus a logit_scale
    state = comfy_state(world["models"][1], "fp16")
    state["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state["logit_scale"] = torch.ones(())
    save_file(state, tmp_path / "clip_g_old.safetensors")
    files = open_text_encoders([world["te"] / "clip_l.safetensors", tmp_path / "clip_g_old.safetensors",
                                world["te"] / "t5xxl_fp16.safetensors"], tokenizers=world["root"])
    clip_g = files.models[1].load(torch.float32)
    assert torch.equal(clip_g.text_projection.weight, world["models"][1].text_projection.weight)


def test_fp8_and_scaled_fp8_are_dequantised_as_comfyui(world: dict, reference: tuple) -> None:
    """Weights equal ComfyUI's dequantisation exactly; against the fp16 weights they differ by fp8 rounding:
    <= 2^-4 relative per weight (3 mantissa bits), T5 states < 15 % relative (measured 7.6 % scaled, 10.8 % plain)."""
    te, states = world["te"], world["t5_states"]
    clips = [te / "clip_l.safetensors", te / "clip_g.safetensors"]
    fp16 = dequantised(states["fp16"])
    for precision, name in (("fp8_scaled", "t5xxl_fp8_e4m3fn_scaled"), ("fp8", "t5xxl_fp8_e4m3fn")):
        files = open_text_encoders([*clips, te / f"{name}.safetensors"], tokenizers=world["root"])
        assert files.describe()["t5xxl"].endswith("(fp8_e4m3fn scaled)" if precision == "fp8_scaled"
                                                  else "(fp8_e4m3fn)")
        t5 = files.models[2].load(torch.float32)
        loaded = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
        expected = dequantised(states[precision])
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key  # exactly weight.float() * scale_weight
            assert (value - fp16[key]).norm() <= 2**-4 * fp16[key].norm(), key
        context, pooled = SD3TextEncoder(*files.load_models()[:2], t5, *files.tokenizers).encode(PROMPTS[:3])
        want = reference[0][:3, 77:]
        assert torch.equal(pooled, reference[1][:3]) and torch.equal(context[:, :77], reference[0][:3, :77])  # fp16
        error = (context[:, 77:] - want).norm() / want.norm()
        assert 0 < error < 0.15, (precision, error)


def test_single_file_checkpoint_text_encoders_and_vae(world: dict) -> None:
    te, checkpoint = world["te"], world["checkpoint"]
    files = open_text_encoders(checkpoint, tokenizers=world["root"])
    assert files.describe()["t5xxl"] == (f"{checkpoint} under 'text_encoders.t5xxl.transformer.' "
                                         "(fp8_e4m3fn scaled)")
    separate = open_text_encoders([te / "clip_l.safetensors", te / "clip_g.safetensors",
                                   te / "t5xxl_fp8_e4m3fn_scaled.safetensors"], tokenizers=world["root"])
    for one, other in zip(files.load_models(), separate.load_models()):  # the same weights: the same encodings
        a, b = one.state_dict(), other.state_dict()
        if one.config.hidden_size == 64:  # clip_l.safetensors has no text_projection: identity, unused by SD3
            assert torch.equal(b.pop("text_projection.weight"), torch.eye(64))
            a.pop("text_projection.weight")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reference = world["vae"].state_dict()
    pixels = torch.rand(1, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        expected = world["vae"].encode(pixels).latent_dist.mean
    for path in (checkpoint, world["root"] / "models" / "vae" / "sd3_vae.safetensors",
                 world["root"] / "models" / "vae" / "sd3_vae_diffusers_names.safetensors", world["diffusers"]):
        vae = load_sd3_vae(path)
        state = vae.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items()), path
        assert vae.config.shift_factor == 0.0609 and vae.config.scaling_factor == 1.5305
        with torch.no_grad():
            assert torch.equal(vae.encode(pixels).latent_dist.mean, expected), path
    assert "ldm names under 'first_stage_model.'" in open_vae(checkpoint).description
    latents = SD3VAEEncoder.from_pretrained(checkpoint, resolution=RES).encode([Image.new("RGB", (RES, RES))], [0])
    assert latents.shape == (1, 16, RES // 8, RES // 8)


def test_tokenizers_are_searched_and_missing_ones_named(world: dict, tmp_path: Path, no_comfyui_env: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("clip_l", "clip_g", "t5xxl_fp16"):
        (loose / f"{name}.safetensors").symlink_to(world["te"] / f"{name}.safetensors")
    with pytest.raises(DRMError, match=r"no tokenizers.*comfy/sd1_tokenizer.*--tokenizers"):
        open_text_encoders(loose)
    partial = tmp_path / "partial"
    write_clip_tokenizer(partial / COMFY_CLIP_TOKENIZER)
    with pytest.raises(DRMError, match=re.escape(str(partial / COMFY_T5_TOKENIZER)) + " is missing"):
        open_text_encoders(loose, tokenizers=partial)
    with pytest.raises(DRMError, match="neither a ComfyUI folder"):
        open_text_encoders(loose, tokenizers=loose)
    from_diffusers = open_text_encoders(loose, tokenizers=world["diffusers"])
    assert from_diffusers.tokenizer_source == f"diffusers {world['diffusers']}"
    monkeypatch.setenv("COMFYUI_PATH", str(world["root"]))
    assert open_text_encoders(loose).tokenizer_source == f"ComfyUI {world['root']}"
    pack_file = tmp_path / "ComfyUI" / "custom_nodes" / "drm-pack" / "training" / "sd3_files.py"
    assert tmp_path / "ComfyUI" in comfyui_roots([loose], module_file=pack_file)  # the install the pack sits in
    # a tokenizer larger than the embedding table is caught before any weight is read
    big = tmp_path / "big"
    write_comfyui_tokenizers(big)
    vocab = json.loads((big / COMFY_CLIP_TOKENIZER / "vocab.json").read_text())
    vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(CLIP_VOCAB)})
    (big / COMFY_CLIP_TOKENIZER / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DRMError, match="do not belong together"):
        open_text_encoders(loose, tokenizers=big)


def test_wrong_files_are_refused_by_name(world: dict, tmp_path: Path) -> None:
    pickle = tmp_path / "t5xxl.ckpt"
    pickle.write_bytes(b"not opened")
    with pytest.raises(DRMError, match=r"t5xxl\.ckpt: only \.safetensors files are read"):
        open_text_encoders(pickle, tokenizers=world["root"])
    truncated = tmp_path / "clip_g.safetensors"
    truncated.write_bytes((world["te"] / "clip_g.safetensors").read_bytes()[:5000])
    with pytest.raises(DRMError, match="not a readable safetensors file"):
        open_text_encoders([world["te"] / "clip_l.safetensors", truncated], tokenizers=world["root"])
    with pytest.raises(DRMError, match=r"no CLIP-L, CLIP-G, T5-XXL found"):
        open_text_encoders(world["root"] / "models" / "vae", tokenizers=world["root"])
    state = dict(world["t5_states"]["fp16"])
    state.pop("encoder.block.1.layer.0.SelfAttention.k.weight")
    save_file(state, tmp_path / "t5_partial.safetensors")
    with pytest.raises(DRMError, match=r"t5_partial.safetensors: the T5-XXL.*missing \['encoder.block.1.layer.0"):
        open_text_encoders([world["te"] / "clip_l.safetensors", world["te"] / "clip_g.safetensors",
                            tmp_path / "t5_partial.safetensors"], tokenizers=world["root"])
    with pytest.raises(DRMError, match="no VAE in this file"):
        open_vae(world["te"] / "clip_l.safetensors")
    with pytest.raises(DRMError, match="Weights must be local"):
        open_vae("stabilityai/stable-diffusion-3.5-medium")


# ----------------------------------------------------------------------------- the commands

def cache_argv(data: Path, out: Path, vae: Path, text: Path) -> list[str]:
    return ["cache", "--data", str(data), "--out", str(out), "--vae", str(vae), "--text-encoders", str(text),
            "--resolution", str(RES), "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]


def test_cache_train_eval_from_comfyui_files_only(world: dict, tmp_path: Path, no_comfyui_env: None,
                                                  capsys: pytest.CaptureFixture) -> None:
    checkpoint = world["checkpoint"]
    data = write_dataset(tmp_path)
    assert main(cache_argv(data, tmp_path / "cache", checkpoint, checkpoint)) == 0
    args = json.loads((tmp_path / "cache" / "cache-args.json").read_text())
    assert args["text_encoders"]["tokenizers"] == f"ComfyUI {world['root']}"
    assert "under 'first_stage_model.'" in args["vae"] and len(PreferenceCache(tmp_path / "cache")) == 6
    run = tmp_path / "run"
    overrides = [f"out={json.dumps(str(run))}", f"model.base={json.dumps(str(checkpoint))}", "model.blocks=2",
                 "model.conv_channels=[16, 16]", "model.groups=4", "model.mlp_hidden=16",
                 f"data.cache={json.dumps(str(tmp_path / 'cache'))}", "data.eval_fraction=0.0", "train.steps=2",
                 "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1"]
    assert main(["train-drm", *(x for o in overrides for x in ("--set", o))]) == 0
    drm = load_drm(run / "drm.safetensors")
    assert drm.provenance["base_model"] == checkpoint.name
    assert drm.provenance["text_encoding"]["scheme"] == "comfyui-sd3"
    capsys.readouterr()
    assert main(["eval-drm", "--drm", str(run / "drm.safetensors"), "--cache", str(tmp_path / "cache"),
                 "--noise-draws", "1"]) == 0
    assert "| sigma | 0 | 0.25 | 0.5 | 0.75 |" in capsys.readouterr().out


def test_train_grpo_and_export_lora_from_comfyui_files_only(world: dict, tmp_path: Path, no_comfyui_env: None,
                                                            capsys: pytest.CaptureFixture) -> None:
    """train-grpo -> export-lora on the single-file checkpoint and models/text_encoders/: no diffusers folder."""
    from drm_core import drm_from_base, save_drm
    from tiny import TINY_HEAD

    checkpoint = world["checkpoint"]
    drm = save_drm(drm_from_base(checkpoint, blocks=2, **TINY_HEAD), tmp_path / "drm.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on the mat\na red car\nbig dog on the road\n")
    run, q = tmp_path / "run", json.dumps
    overrides = [f"out={q(str(run))}", f"policy.base={q(str(checkpoint))}", "policy.lora_rank=2",
                 "policy.lora_alpha=4.0", f"reward.drm={q(str(drm))}", f"prompts.file={q(str(prompts))}",
                 f"prompts.text_encoders={q(str(world['te']))}", "prompts.eval_prompts=2", "grpo.iterations=2",
                 "grpo.prompts_per_iteration=1", "grpo.group=2", "grpo.steps=2", "grpo.eval_steps=2",
                 "grpo.eval_every=2", "grpo.resolution=32", "grpo.cfg_scale=2.0", "grpo.patience=0", "grpo.train_sigma_max=1.0"]
    assert main(["train-grpo", *(x for o in overrides for x in ("--set", o))]) == 0
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["iter_000000.png", "iter_000002.png"]
    lora = tmp_path / "lora.safetensors"
    assert main(["export-lora", str(run), "--out", str(lora)]) == 0
    capsys.readouterr()
    assert main(["verify-lora", str(lora), "--base", str(checkpoint)]) == 0
    assert "ComfyUI" in capsys.readouterr().out


def test_wrong_text_encoders_path_fails_before_any_image(world: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    encoded = []
    monkeypatch.setattr(encoders_module.SD3VAEEncoder, "encode", lambda self, images, ids: encoded.append(ids))
    data = write_dataset(tmp_path)
    cases = [(world["root"] / "models" / "vae", "no CLIP-L, CLIP-G, T5-XXL found"),
             (tmp_path / "no" / "such" / "folder", "no such local file or folder")]
    for wrong, problem in cases:
        caplog.clear()
        start = time.perf_counter()
        assert main(cache_argv(data, tmp_path / "cache", world["checkpoint"], wrong)) == 2
        assert time.perf_counter() - start < 10
        assert f"text encoders {wrong}: {problem}" in caplog.text
        assert encoded == [] and not list((tmp_path / "cache").glob("*.safetensors"))
    (tmp_path / "file").write_text("")
    assert main(cache_argv(data, tmp_path / "file" / "cache", world["checkpoint"], world["te"])) == 2
    assert f"--out {tmp_path / 'file' / 'cache'}: cannot write there" in caplog.text and encoded == []


# ----------------------------------------------------------------------------- optional: ComfyUI's own tokenizers

COMFYUI = os.environ.get("COMFYUI_PATH")


@pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to load its tokenizer folders")
def test_real_comfyui_tokenizer_folders_load(tmp_path: Path) -> None:
    (tok_l, tok_g, tok_t5), source = find_tokenizers([tmp_path])
    assert source == f"ComfyUI {Path(COMFYUI).absolute()}"
    assert tok_l("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok_t5("a photo of a cat")["input_ids"] == [3, 9, 1202, 13, 3, 9, 1712, 1]
    scheme = clip_scheme(tok_g, pad_with_end=False)
    assert (scheme.start, scheme.end, scheme.pad) == (49406, 49407, 0) and len(tok_l) == 49408
