"""The `cache` command and its encoders: ComfyUI-exact SD3 prompt encoding, VAE latents, resume."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from drm_core import DRMError
from drm_core.latents import to_model_space
from training.cache import build_cache
from training.cache_format import PreferenceCache
from training.cli import main
from training.data import load_preferences
from training.encoders import (SD3TextEncoder, SD3VAEEncoder, apply_weights, clip_scheme, empty_tokens,
                               parse_prompt, preprocess_image, t5_scheme, tokenize)

WORDS = "a cat dog on the mat big red photo of car road night , . x y z".split()
RES = 32  # pixels; latents 16 x 4 x 4


# ----------------------------------------------------------------------------- tiny models

def clip_tokenizer():
    """A word-level CLIP-like tokenizer: <|startoftext|> text <|endoftext|>, "!" is id 0 like real CLIP."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<unk>": 3, "(": 4, ")": 5, ":": 6}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")


def t5_tokenizer():
    """A word-level T5-like tokenizer: text </s>, <pad> = 0, </s> = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "(": 3, ")": 4, ":": 5}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def text_models(seed: int = 0):
    """Tiny CLIP-L (hidden 32), CLIP-G (hidden 32, projection 2016) and T5 (d_model 4096): pooled 32 + 2016."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = dict(vocab_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=2048 - 32,
                                                        hidden_act="gelu", **clip))
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=4096, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    return [m.eval() for m in (clip_l, clip_g, t5)]


@pytest.fixture(scope="module")
def text_encoder() -> SD3TextEncoder:
    return SD3TextEncoder(*text_models(), clip_tokenizer(), clip_tokenizer(), t5_tokenizer())


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-style SD3 pipeline folder with the tiny text encoders and tokenizers."""
    root = tmp_path_factory.mktemp("sd3")
    for sub, obj in zip(("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                         "tokenizer_3"), [*text_models(), clip_tokenizer(), clip_tokenizer(), t5_tokenizer()]):
        obj.save_pretrained(root / sub)
    return root


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    options = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                   sample_size=RES, shift_factor=0.0609, scaling_factor=1.5305)
    return AutoencoderKL(**{**options, **config}).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(root)
    return root


class FakeText:
    """Deterministic fake text encoder: random conditioning seeded by the prompt text."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.prompts += prompts
        gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        return (torch.stack([torch.randn(154, 4096, generator=g) for g in gens]),
                torch.stack([torch.randn(2048, generator=g) for g in gens]))


# ----------------------------------------------------------------------------- ComfyUI tokenisation

def test_parse_prompt_like_comfyui() -> None:
    assert parse_prompt("a (cat:1.3) \\(dog\\) ((big))") == [("a ", 1.0), ("cat", 1.3), (" (dog) ", 1.0),
                                                             ("big", pytest.approx(1.21))]
    assert parse_prompt("(x:abc) y") == [("x:abc", pytest.approx(1.1)), (" y", 1.0)]
    assert parse_prompt("") == []


def test_tokenize_like_comfyui() -> None:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    ids = clip("a cat")["input_ids"][1:-1]
    l_chunks = tokenize("a cat", clip, clip_scheme(clip, pad_with_end=True))
    g_chunks = tokenize("a cat", clip, clip_scheme(clip, pad_with_end=False))
    assert [t for t, _ in l_chunks[0]] == [1, *ids, 2] + [2] * 73  # CLIP-L pads with its end token
    assert [t for t, _ in g_chunks[0]] == [1, *ids, 2] + [0] * 73  # CLIP-G pads with 0
    t5_ids = [t for t, _ in tokenize("a cat", t5, t5_scheme(t5))[0]]
    assert t5_ids == [*t5("a cat")["input_ids"][:-1], 1] + [0] * 74  # no start token, min length 77
    assert tokenize("", clip, clip_scheme(clip, True))[0][:3] == [(1, 1.0), (2, 1.0), (2, 1.0)]
    # 80 one-token words: chunks of start + 75 + end; T5 keeps all 80 (+ end), no chunking
    long = " ".join(["cat"] * 80)
    chunks = tokenize(long, clip, clip_scheme(clip, True))
    assert [len(c) for c in chunks] == [77, 77] and chunks[0][-1] == (2, 1.0) and chunks[1][6] == (2, 1.0)
    assert len(tokenize(long, t5, t5_scheme(t5))[0]) == 81
    # a short word (< 8 tokens) that does not fit moves whole to the next chunk
    chunks = tokenize(" ".join(["cat"] * 73) + ", (dog dog dog:1.2)", clip, clip_scheme(clip, True))
    comma, dog = clip(",")["input_ids"][1], clip("dog")["input_ids"][1]
    assert [t for t, _ in chunks[0][73:]] == [8, comma, 2, 2]  # end token, then padding
    assert chunks[1][:5] == [(1, 1.0)] + [(dog, pytest.approx(1.2))] * 3 + [(2, 1.0)]
    assert empty_tokens(clip_scheme(clip, False), 5) == [1, 2, 0, 0, 0]


# ----------------------------------------------------------------------------- SD3 text encoder

def test_sd3_text_encoder_matches_its_parts(text_encoder: SD3TextEncoder) -> None:
    prompts = ["a cat on the mat", "", "a red car on the road at night"]
    context, pooled = text_encoder.encode(prompts)
    assert context.shape == (3, 154, 4096) and pooled.shape == (3, 2048) and context.dtype == torch.float32
    clip_l, clip_g, t5 = text_encoder.clip_l, text_encoder.clip_g, text_encoder.t5
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids_l, ids_g, ids_t5 = ([t for t, _ in chunks[0]] for chunks in text_encoder.tokenize(prompt))
            out_l = clip_l(input_ids=torch.tensor([ids_l]), output_hidden_states=True)
            out_g = clip_g(input_ids=torch.tensor([ids_g]), output_hidden_states=True)
            eos = ids_l.index(2)
            torch.testing.assert_close(context[i, :77, :32], out_l.hidden_states[-2][0])  # penultimate, no norm
            torch.testing.assert_close(context[i, :77, 32:64], out_g.hidden_states[-2][0])
            assert context[i, :77, 64:].abs().max() == 0  # zero padding to 4096
            torch.testing.assert_close(context[i, 77:], t5(input_ids=torch.tensor([ids_t5])).last_hidden_state[0])
            torch.testing.assert_close(pooled[i, :32], out_l.last_hidden_state[0, eos])  # CLIP-L unprojected
            torch.testing.assert_close(pooled[i, 32:], clip_g.text_projection(out_g.last_hidden_state[0, eos]))
    one, _ = text_encoder.encode(prompts[2:])
    torch.testing.assert_close(one[0], context[2], atol=1e-5, rtol=1e-5)  # batching does not matter


def test_sd3_text_encoder_weights_and_long_prompts(text_encoder: SD3TextEncoder) -> None:
    plain, _ = text_encoder.encode(["a cat on the mat"])
    weighted, _ = text_encoder.encode(["a (cat:1.5) on the mat"])
    empty_l = text_encoder.clip_l(input_ids=torch.tensor([[1, 2] + [2] * 75]), output_hidden_states=True)
    expected = apply_weights(plain[0, :77, :32], torch.tensor([1.0, 1.0, 1.5] + [1.0] * 74),
                             empty_l.hidden_states[-2][0].detach())
    torch.testing.assert_close(weighted[0, :77, :32], expected)  # (z - z_empty) * w + z_empty on "cat" only
    keep = [i for i in range(77) if i != 2]
    torch.testing.assert_close(weighted[0, keep], plain[0, keep])  # CLIP tokens of weight 1 are unchanged
    assert not torch.allclose(weighted[0, 77:], plain[0, 77:])  # T5 weighted too
    before = text_encoder.truncated
    long_context, _ = text_encoder.encode([" ".join(["cat"] * 100), "a dog"])
    assert long_context.shape == (2, 154, 4096) and text_encoder.truncated == before + 1


def test_text_encoders_must_be_local(tmp_path: Path) -> None:
    with pytest.raises(DRMError, match="Weights must be local"):
        SD3TextEncoder.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(DRMError, match="missing subfolder"):
        SD3TextEncoder.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- VAE encoder

def test_preprocess_and_vae_encoder(vae_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    wide = Image.fromarray(np.concatenate([np.full((40, 10, 3), 0, np.uint8), np.full((40, 60, 3), 255, np.uint8),
                                           np.full((40, 10, 3), 0, np.uint8)], axis=1))
    pixels = preprocess_image(wide, RES)  # 80x40 -> 64x32 (black 8, white 48, black 8) -> center 32: white
    assert pixels.shape == (3, RES, RES) and torch.allclose(pixels, torch.ones_like(pixels))
    encoder = SD3VAEEncoder.from_pretrained(vae_folder, resolution=RES, seed=3)
    images = [wide, Image.new("RGB", (RES, RES), (10, 20, 30))]
    latents = encoder.encode(images, [7, 8])
    assert latents.shape == (2, 16, RES // 8, RES // 8)
    torch.testing.assert_close(encoder.encode(images[1:], [8])[0], latents[1], atol=1e-5, rtol=1e-5)
    dist = encoder.vae.encode(torch.stack([preprocess_image(images[0], RES)])).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(3 * 1_000_003 + 7))
    torch.testing.assert_close(latents[0], to_model_space(dist.mean[0] + dist.std[0] * noise))
    assert not torch.allclose(encoder.encode(images[:1], [8])[0], latents[0])  # noise fixed by image id
    with pytest.raises(DRMError, match="16"):
        SD3VAEEncoder(tiny_vae(latent_channels=4))
    with caplog.at_level(logging.WARNING):
        SD3VAEEncoder(tiny_vae(shift_factor=None, scaling_factor=0.18215))
    assert "using SD3's 0.0609 / 1.5305" in caplog.text
    with pytest.raises(DRMError, match="Weights must be local"):
        SD3VAEEncoder.from_pretrained("stabilityai/stable-diffusion-3.5-medium")


# ----------------------------------------------------------------------------- the cache command

def write_dataset(root: Path) -> Path:
    """Five images of different sizes, one truncated (header fine, pixels not), and 7 JSONL rows."""
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 32), (32, 48), (32, 32), (64, 40), (36, 36)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (root / "trunc.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    rows = [("a cat", 0, 1), ("a dog", 2, 1), ("a cat", 3, 4), ("a red car", 4, 0), ("a dog", 1, 3),
            ("a cat", "trunc", 2), ("a cat", "missing", 2), ("big dog", 0, 2)]
    path = root / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "chosen": f"{w}.png", "rejected": f"{l}.png"})
                              for p, w, l in rows) + "\n{\"prompt\": \"x\"}\n")
    return path


def test_cache_command_end_to_end(tmp_path: Path, sd3_folder: Path, vae_folder: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    data = write_dataset(tmp_path)
    out = tmp_path / "cache"
    argv = ["cache", "--data", str(data), "--out", str(out), "--vae", str(vae_folder), "--text-encoders",
            str(sd3_folder), "--resolution", str(RES), "--batch-size", "2", "--shard-size", "3",
            "--device", "cpu", "--dtype", "float32", "--store-dtype", "float32", "--seed", "5"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    cache = PreferenceCache(out)
    assert len(cache) == 6  # 9 rows: 1 missing image, 1 malformed, 1 truncated image (found when decoding)
    assert cache.n_images == 5 and cache.n_prompts == 4
    item = cache[0]
    assert item["win"].shape == (16, RES // 8, RES // 8) and item["context"].shape == (154, 4096)
    assert item["pooled"].shape == (2048,)
    meta = json.loads((out / "cache.json").read_text())
    assert meta["text"]["scheme"] == "comfyui-sd3" and meta["text"]["t5_min_length"] == 77
    assert meta["skipped"] == {"missing_image": 1, "malformed_row": 1, "unreadable_image": 1}
    assert meta["sources"] == [str(data.resolve())] and meta["counts"]["pairs"] == 6
    assert "trunc.png" in caplog.text and "cannot decode" in caplog.text
    # stored values are what the encoders give
    loaded = load_preferences([data])
    first = loaded.pairs[0]
    vae = SD3VAEEncoder.from_pretrained(vae_folder, resolution=RES, seed=5)
    torch.testing.assert_close(item["win"], vae.encode([Image.open(loaded.images[first[1]])], [first[1]])[0])
    context, pooled = SD3TextEncoder.from_pretrained(sd3_folder).encode([loaded.prompts[first[0]]])
    torch.testing.assert_close(item["context"], context[0])
    torch.testing.assert_close(item["pooled"], pooled[0])
    # a hub id fails with a clear message and exit code 2
    caplog.clear()
    hub = argv.copy()
    hub[hub.index("--text-encoders") + 1] = "stabilityai/stable-diffusion-3.5-medium"
    assert main(hub) == 2 and "Weights must be local" in caplog.text


class Killed(RuntimeError):
    pass


class KillAfter:
    """Wraps an image encoder; raises after `n` encode calls (a simulated kill)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def encode(self, images, ids):
        if self.n == 0:
            raise Killed
        self.n -= 1
        return self.inner.encode(images, ids)


def cache_contents(root: Path) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for kind, key in (("images", "latents"), ("prompts", "context")):
        out[kind] = {}
        for path in sorted(root.glob(f"{kind}-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for i, t in zip(f.get_tensor("ids").tolist(), f.get_tensor(key)):
                    out[kind][i] = t
    return out


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, vae_folder: Path) -> None:
    data = load_preferences([write_dataset(tmp_path)])
    vae = SD3VAEEncoder.from_pretrained(vae_folder, resolution=RES, seed=1)
    settings = {"resolution": RES, "seed": 1}

    def build(out: Path, image_encoder, text: FakeText, **overrides) -> Path:
        return build_cache(data, out, lambda: image_encoder, lambda: text, {"scheme": "fake"},
                           {**settings, **overrides}, batch_size=2, shard_size=2, store_dtype=torch.float32)

    reference = build(tmp_path / "ref", vae, FakeText())
    with pytest.raises(Killed):
        build(tmp_path / "resumed", KillAfter(vae, 2), FakeText())
    partial = cache_contents(tmp_path / "resumed")
    assert len(partial["images"]) == 4 and not (tmp_path / "resumed" / "cache.json").exists()
    text = FakeText()
    build(tmp_path / "resumed", KillAfter(vae, 1), text)  # only one image batch is left to encode
    assert text.prompts == data.prompts
    text = FakeText()
    build(tmp_path / "resumed", KillAfter(vae, 0), text)  # complete: nothing is encoded again
    assert text.prompts == []
    ref, resumed = cache_contents(reference), cache_contents(tmp_path / "resumed")
    for kind in ("images", "prompts"):
        assert sorted(ref[kind]) == sorted(resumed[kind])
        for i in ref[kind]:
            torch.testing.assert_close(ref[kind][i], resumed[kind][i], atol=1e-6, rtol=1e-5)
    a, b = PreferenceCache(reference), PreferenceCache(tmp_path / "resumed")
    assert torch.equal(a.pairs, b.pairs) and torch.equal(a.confidence, b.confidence)
    with pytest.raises(DRMError, match="other settings.*resolution"):
        build(tmp_path / "resumed", vae, FakeText(), resolution=64)


# ----------------------------------------------------------------------------- optional: against ComfyUI itself

COMFY_CHECK = r'''
import sys, tempfile
comfy_dir, main_dir = sys.argv[1:3]
sys.path[:0] = [comfy_dir, main_dir]
import comfy.options; comfy.options.enable_args_parsing(False)
from comfy.cli_args import args; args.cpu = True
import torch, comfy.text_encoders.sd3_clip as sd3
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, CLIPTokenizer, T5TokenizerFast
from training.encoders import SD3TextEncoder
torch.manual_seed(0)
L = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2)
G = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2)
T = dict(d_model=4096, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
mk = lambda act, c: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
    hidden_act=act, projection_dim=c["hidden_size"], eos_token_id=49407, **c)).eval()
clip_l, clip_g = mk("quick_gelu", L), mk("gelu", G)
t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **T)).eval()
with torch.no_grad():
    for m in (clip_l, clip_g, t5):
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)
tok = CLIPTokenizer.from_pretrained(comfy_dir + "/comfy/sd1_tokenizer")
ours = SD3TextEncoder(clip_l, clip_g, t5, tok, tok, T5TokenizerFast.from_pretrained(comfy_dir + "/comfy/text_encoders/t5_tokenizer"))
theirs = sd3.SD3ClipModel(device="cpu", dtype=torch.float32, model_options={"clip_l_model_config": L, "clip_g_model_config": G, "t5xxl_model_config": T})
theirs.clip_l.load_sd(clip_l.state_dict()); theirs.clip_g.load_sd(clip_g.state_dict()); theirs.t5xxl.load_sd(t5.state_dict())
tokenizer = sd3.SD3Tokenizer(embedding_directory=[tempfile.mkdtemp()])
prompts = ["a photo of a cat", "", "A (red:1.3) car on a ((wet)) road, \\(night\\)", "portrait embedding:foo, of a man",
           " ".join(["a very long prompt about many things"] * 14)]
context, pooled = ours.encode(prompts)
worst = 0.0
for i, p in enumerate(prompts):
    tokens = tokenizer.tokenize_with_weights(p)
    with torch.no_grad():
        cond, pool, _ = theirs.encode_token_weights(tokens)
    n = 77 * min(len(tokens["l"]), len(tokens["g"]))
    ref = torch.cat([cond[0, :77], cond[0, n:n + 77]])
    worst = max(worst, (ref - context[i]).abs().max().item(), (pool[0] - pooled[i]).abs().max().item())
print("WORST", worst)
'''


COMFYUI = os.environ.get("COMFYUI_PATH")


@pytest.mark.skipif(not COMFYUI or importlib.util.find_spec("einops") is None,
                    reason="set COMFYUI_PATH to a ComfyUI checkout and run with its Python to compare the prompt "
                           "encoding with ComfyUI's own SD3 text encoder (about 20 s)")
def test_prompt_encoding_equals_comfyui() -> None:
    result = subprocess.run([sys.executable, "-c", COMFY_CHECK, COMFYUI, str(Path(__file__).resolve().parents[1])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split("WORST")[-1])
    assert worst < 1e-3, result.stdout
