import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from drm_core import DRMError, drm_from_base, load_drm, load_mmdit, save_drm
from training.config import load_config
from training.grpo_core import Policy
from training.grpo_inputs import prompt_embeddings, read_prompt_file
from training.lora import verify_lora
from training.sample_grid import decode_images, image_grid, load_vae
from training.train_grpo import PromptSection, TrainGRPOConfig, evaluate, train
from multiproc import HAVE_TORCHRUN, torchrun
from test_cache import clip_tokenizer, t5_tokenizer, text_models, tiny_vae
from tiny import TINY_HEAD, conditioning, tiny_transformer

NEGATIVE = PromptSection().negative


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tiny_transformer().save_pretrained(root / "base")
    save_drm(drm_from_base(root / "base", blocks=2, **TINY_HEAD), root / "drm.safetensors")
    ctx, pooled = conditioning(7, tokens=5)  # 6 prompts and (last row) the encoded negative prompt
    (root / "prompts").mkdir()
    save_file({"context": ctx[:6], "pooled": pooled[:6], "negative_context": ctx[6:], "negative_pooled": pooled[6:]},
              root / "prompts" / "prompt_embeddings.safetensors", {"negative": NEGATIVE})
    tiny_vae().save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def sd3_text(tmp_path_factory):
    """A diffusers-style SD3 folder with tiny text encoders and tokenizers (the ones test_cache uses)."""
    root = tmp_path_factory.mktemp("sd3_text")
    for sub, obj in zip(("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                         "tokenizer_3"), [*text_models(), clip_tokenizer(), clip_tokenizer(), t5_tokenizer()]):
        obj.save_pretrained(root / sub)
    return root


def config(world, out, *extra):
    q = json.dumps
    return load_config(TrainGRPOConfig, None, [
        f"out={q(str(out))}", f"policy.base={q(str(world / 'base'))}", "policy.lora_rank=2", "policy.lora_alpha=4.0",
        f"reward.drm={q(str(world / 'drm.safetensors'))}", f"prompts.cache={q(str(world / 'prompts'))}",
        "prompts.eval_prompts=2", "grpo.iterations=4", "grpo.prompts_per_iteration=2", "grpo.group=3",
        "grpo.steps=3", "grpo.eval_steps=3", "grpo.eval_every=2", "grpo.checkpoint_every=1", "grpo.resolution=64",
        "grpo.cfg_scale=2.0", "grpo.lr=1e-3", "grpo.clip_range=0.2", "grpo.patience=0",
        "grpo.train_sigma_max=1.0", *extra])  # 3 steps: every step trained


@pytest.mark.parametrize("mode", ["step", "terminal"])
def test_both_modes_train_and_export_a_comfyui_ready_lora(world, tmp_path, mode):
    out = tmp_path / mode
    final = train(config(world, out, f'grpo.mode="{mode}"'))
    assert final.is_file() and (out / "best_lora.safetensors").is_file()
    check = verify_lora(final, world / "base")
    assert check["problems"] == [] and check["entries"]  # verify_lora compares the scale each loader applies
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/holdout_reward" in rows[0]  # the base model, for comparison
    assert {"reward", "kl", "clip_fraction", "seconds"} <= set(rows[1]) and any(
        "eval/holdout_reward" in r for r in rows[1:])
    assert not (out / "samples").exists()  # a diffusers transformer folder holds no VAE and policy.vae is unset
    with safe_open(str(final), "pt") as f:
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if "lora_B" in k)  # it learned something


def test_guard_alarm_stops_and_keeps_the_last_lora_that_passed(world, tmp_path, monkeypatch, caplog):
    """Held-out prompt alignment falling below the floor (tolerance x the base's) is reward hacking: warn, stop,
    keep best_lora.safetensors from before the alarm (its iteration is in the file)."""
    import logging

    import training.train_grpo as tg

    measured = iter([1.0, 0.99, 0.5, 0.4])  # base, it 2 (passes), it 4 (fails: floor 0.9)
    monkeypatch.setattr(tg, "alignment", lambda *a, **k: next(measured))
    out = tmp_path / "guarded"
    with caplog.at_level(logging.WARNING, logger="training.train_grpo"):
        final = train(config(world, out, "grpo.iterations=8", "grpo.guard_tolerance=0.1"))
    assert "divergence alarm at iteration 4" in caplog.text and "reward hacking" in caplog.text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4  # stopped at the alarm, not at iteration 8
    assert [r["eval/prompt_alignment"] for r in rows if "eval/prompt_alignment" in r] == [1.0, 0.99, 0.5]
    from training.lora import DRM_KEY

    with safe_open(str(out / "best_lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[DRM_KEY])["iteration"] == 2
    assert final.is_file()


def test_guard_and_step_window_settings_are_checked(world, tmp_path):
    with pytest.raises(DRMError, match="grpo.train_sigma_max = 0.3 leaves no step to train in the 3-step"):
        train(config(world, tmp_path / "a", "grpo.train_sigma_max=0.3"))
    with pytest.raises(DRMError, match="prompts.eval_prompts >= 2"):
        train(config(world, tmp_path / "b", "prompts.eval_prompts=1"))


def test_kill_and_resume_equals_uninterrupted(world, tmp_path):
    full = train(config(world, tmp_path / "full"))
    killed = config(world, tmp_path / "killed")
    train(killed, stop_after=2)
    resumed = train(killed, resume="latest")
    with safe_open(str(full), "pt") as a, safe_open(str(resumed), "pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert read_prompt_file(tmp_path / "p.txt") == ["a cat", "a dog"] == read_prompt_file(tmp_path / "p.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(Exception, match="bad.jsonl:1"):
        read_prompt_file(tmp_path / "bad.jsonl")


def test_export_lora_from_a_checkpoint(world, tmp_path):
    from training.cli import main

    train(config(world, tmp_path / "run"))
    out = tmp_path / "exported.safetensors"
    assert main(["export-lora", str(tmp_path / "run"), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.skipif(not HAVE_TORCHRUN, reason="torchrun not installed")
def test_two_processes_run_step_grpo(world, tmp_path):
    """Step-GRPO under torchrun: each process its own prompts and local groups, LoRA gradients averaged."""
    torchrun("train-grpo", config(world, tmp_path / "two", "grpo.iterations=2", "grpo.eval_every=2",
                                  "grpo.checkpoint_every=2"), tmp_path)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["processes"] == 2 and (tmp_path / "two" / "lora.safetensors").is_file()


def test_sample_grids_show_the_base_model_then_the_lora_from_the_same_noise(world, tmp_path):
    """iter_000000.png is the base model under the cached negative, ODE-sampled and decoded; grids go to TensorBoard."""
    out = tmp_path / "run"
    train(config(world, out, f"policy.vae={json.dumps(str(world / 'vae'))}", "grpo.eval_images=2"))
    pngs = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert pngs == ["iter_000000.png", "iter_000002.png", "iter_000004.png"]
    grid0 = np.asarray(Image.open(out / "samples" / "iter_000000.png"))
    assert grid0.shape == (64, 128, 3)  # two 64 px held-out samples side by side

    cfg = config(world, out).grpo
    emb = prompt_embeddings(PromptSection(cache=str(world / "prompts")), out)
    base = Policy(load_mmdit(world / "base"), emb.context, emb.pooled, cfg.cfg_scale, emb.negative_context,
                  emb.negative_pooled)
    held, samples = evaluate(base, load_drm(world / "drm.safetensors"), torch.arange(2), cfg, 8, torch.float32)
    expected = image_grid(decode_images(load_vae(world / "vae", "cpu", torch.float32), samples, "cpu"))
    assert np.abs(grid0.astype(int) - expected.astype(int)).max() <= 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/holdout_reward"] == pytest.approx(held, rel=1e-4, abs=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("eval/samples")
    assert [e.step for e in images] == [0, 2, 4] and (images[0].width, images[0].height) == (128, 64)


def test_evaluation_samples_with_the_ode_by_default(world):
    """eval_noise_level 0: two evaluations from the same noise agree, and equal an explicit Euler ODE loop."""
    from drm_core import flow_sigmas

    cfg = TrainGRPOConfig().grpo
    cfg.eval_steps, cfg.cfg_scale = 3, 2.0
    assert cfg.eval_noise_level == 0.0
    ctx, pooled = conditioning(2, tokens=5)
    policy = Policy(load_mmdit(world / "base"), ctx, pooled, cfg.cfg_scale, ctx[:1] * 0.5, pooled[:1] * 0.5)
    drm = load_drm(world / "drm.safetensors")
    rows = torch.arange(2)
    _, a = evaluate(policy, drm, rows, cfg, 8, torch.float32)
    x = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(123_456))
    sigmas = flow_sigmas(3)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * policy.velocity(x, float(s), rows)
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


def test_prompt_cache_stores_the_negative_and_reencodes_it_when_it_changes(sd3_text, tmp_path):
    from training.encoders import SD3TextEncoder

    texts = ["a cat on the mat", "a red car", "a dog"]
    section = PromptSection(text_encoders=str(sd3_text))
    first = prompt_embeddings(section, tmp_path, texts)
    path = tmp_path / "prompts" / "prompt_embeddings.safetensors"
    encoder = SD3TextEncoder.from_pretrained(sd3_text)
    neg_ctx, neg_pooled = encoder.encode([NEGATIVE])
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["negative"] == NEGATIVE and json.loads(f.metadata()["prompts"]) == texts
        torch.testing.assert_close(f.get_tensor("negative_context"), neg_ctx)  # [1, 154, 4096], like the prompts
        torch.testing.assert_close(f.get_tensor("negative_pooled"), neg_pooled)
    assert first.negative_context.shape == (1, *first.context.shape[1:])

    other = prompt_embeddings(PromptSection(text_encoders=str(sd3_text), negative="a photo"), tmp_path, texts)
    torch.testing.assert_close(other.negative_context, encoder.encode(["a photo"])[0])
    assert torch.equal(other.context, first.context)  # only the negative was re-encoded
    with pytest.raises(DRMError, match=r"prompts\.negative = 'blurry.*a photo"):
        prompt_embeddings(PromptSection(), tmp_path, texts)  # another negative, no text encoders to re-encode it
    with pytest.raises(DRMError, match="other prompts than prompts.file"):
        prompt_embeddings(PromptSection(negative="a photo"), tmp_path, texts + ["a new prompt"])


def test_train_encodes_prompts_from_a_file_with_the_text_encoders(world, sd3_text, tmp_path):
    """The ComfyUI-shaped path: prompt file + text encoders -> 154-token prompts and negative -> one iteration."""
    (tmp_path / "p.txt").write_text("a cat\na dog\na red car\n")
    out = tmp_path / "run"
    train(config(world, out, 'prompts.cache=""', f"prompts.file={json.dumps(str(tmp_path / 'p.txt'))}",
                 f"prompts.text_encoders={json.dumps(str(sd3_text))}", "prompts.eval_prompts=1", "grpo.guard_tolerance=0",
                 "grpo.iterations=1", "grpo.steps=2", "grpo.eval_steps=2", "grpo.group=2"))
    with safe_open(str(out / "prompts" / "prompt_embeddings.safetensors"), "pt") as f:
        assert f.get_slice("negative_context").get_shape() == [1, 154, 4096]
        assert f.get_slice("context").get_shape() == [3, 154, 4096] and f.metadata()["negative"] == NEGATIVE
    assert (out / "lora.safetensors").is_file()


@pytest.mark.parametrize("key, problem", [
    ("prompts.text_encoders", "missing"), ("reward.drm", "missing"), ("reward.drm", "not_a_drm"),
    ("reward.drm", "other_family"), ("policy.vae", "missing"), ("policy.vae", "no_decoder"),
    ("prompts.file", "too_few"), ("out", "not_writable")])
def test_inputs_are_checked_before_any_model_is_built(world, tmp_path, monkeypatch, key, problem):
    """A wrong path or an incompatible file fails in seconds, naming the config key and the path."""
    import training.train_grpo as train_grpo

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(train_grpo, "load_mmdit", no_models)
    monkeypatch.setattr(train_grpo, "load_drm", no_models)
    monkeypatch.setattr(train_grpo, "prompt_embeddings", no_models)
    bad = tmp_path / "nowhere" / "x.safetensors"
    if problem == "not_a_drm":
        bad = tmp_path / "plain.safetensors"
        save_file({"w": torch.zeros(1)}, bad)
    elif problem == "other_family":
        bad = tmp_path / "drm_other.safetensors"
        tiny_transformer(joint_attention_dim=64).save_pretrained(tmp_path / "other_base")
        save_drm(drm_from_base(tmp_path / "other_base", blocks=1, **TINY_HEAD), bad)
    elif problem == "no_decoder":
        bad = tmp_path / "not_a_vae.safetensors"
        save_file({"encoder.conv_in.weight": torch.zeros(1)}, bad)
    elif problem == "too_few":
        bad = tmp_path / "two.txt"
        bad.write_text("a cat\na dog\n")  # eval_prompts = 2 needs at least 3
    elif problem == "not_writable":
        bad = tmp_path / "file_not_folder"
        bad.write_text("")
    setting = f"{key}={json.dumps(str(bad))}"
    cfg = config(world, tmp_path / "out", setting) if key != "out" else config(world, bad)
    tick = time.perf_counter()
    with pytest.raises(DRMError) as err:
        train(cfg)
    assert time.perf_counter() - tick < 10
    assert f"{key} = {bad}" in str(err.value)
    if problem == "other_family":
        assert "context_dim 64" in str(err.value)


def test_sample_grids_use_the_vae_inside_a_single_file_checkpoint(world, tmp_path):
    """policy.vae = "": a ComfyUI-style single-file checkpoint (model.diffusion_model.*, first_stage_model.*)."""
    from drm_core import read_backbone_config
    from drm_core.keys import to_stability

    mmdit = load_mmdit(world / "base").state_dict()
    single = {f"model.diffusion_model.{k}": v for k, v in
              to_stability(mmdit, read_backbone_config(world / "base", blocks=4)[2]).items()}
    vae = tiny_vae(block_out_channels=(32, 32, 32, 32), norm_num_groups=32)  # SD3 VAEs use 32 norm groups
    single.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    checkpoint = tmp_path / "sd3.5_tiny.safetensors"
    save_file(single, checkpoint)
    out = tmp_path / "run"
    train(config(world, out, f"policy.base={json.dumps(str(checkpoint))}", "grpo.iterations=2", "grpo.eval_images=1"))
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["iter_000000.png", "iter_000002.png"]
    assert np.asarray(Image.open(out / "samples" / "iter_000002.png")).shape == (64, 64, 3)
