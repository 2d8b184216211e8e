import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drm_core import drm_from_base, save_drm
from training.config import load_config
from training.lora import verify_lora
from training.train_grpo import TrainGRPOConfig, read_prompt_file, train
from multiproc import HAVE_TORCHRUN, torchrun
from tiny import TINY_HEAD, conditioning, tiny_transformer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tiny_transformer().save_pretrained(root / "base")
    save_drm(drm_from_base(root / "base", blocks=2, **TINY_HEAD), root / "drm.safetensors")
    ctx, pooled = conditioning(6, tokens=5)
    (root / "prompts").mkdir()
    save_file({"context": ctx, "pooled": pooled}, root / "prompts" / "prompt_embeddings.safetensors")
    return root


def config(world, out, *extra):
    q = json.dumps
    return load_config(TrainGRPOConfig, None, [
        f"out={q(str(out))}", f"policy.base={q(str(world / 'base'))}", "policy.lora_rank=2", "policy.lora_alpha=4.0",
        f"reward.drm={q(str(world / 'drm.safetensors'))}", f"prompts.cache={q(str(world / 'prompts'))}",
        "prompts.eval_prompts=2", "grpo.iterations=4", "grpo.prompts_per_iteration=2", "grpo.group=3",
        "grpo.steps=3", "grpo.eval_steps=3", "grpo.eval_every=2", "grpo.checkpoint_every=1", "grpo.resolution=64",
        "grpo.cfg_scale=2.0", "grpo.lr=1e-3", "grpo.clip_range=0.2", "grpo.patience=0", *extra])


@pytest.mark.parametrize("mode", ["step", "terminal"])
def test_both_modes_train_and_export_a_comfyui_ready_lora(world, tmp_path, mode):
    out = tmp_path / mode
    final = train(config(world, out, f'grpo.mode="{mode}"'))
    assert final.is_file() and (out / "best_lora.safetensors").is_file()
    check = verify_lora(final, world / "base")
    assert check["problems"] == [] and {e["comfyui_scale"] for e in check["entries"]} == {2.0}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "clip_fraction", "seconds"} <= set(rows[0]) and any("eval/holdout_reward" in r for r in rows)
    with safe_open(str(final), "pt") as f:
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if "lora_B" in k)  # it learned something


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
