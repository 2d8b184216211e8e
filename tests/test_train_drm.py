import json
from pathlib import Path

import pytest
import torch

from drm_core import DRMError, load_drm
from training.cache_format import CacheWriter, PreferenceCache
from training.cli import main
from training.config import load_config, to_toml
from training.train_drm import TrainDRMConfig, train
from multiproc import HAVE_TORCHRUN, torchrun
from tiny import conditioning, tiny_transformer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD3.5-shaped base and a cache whose winner is the brighter latent (learnable)."""
    root = tmp_path_factory.mktemp("world")
    tiny_transformer().save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(40, 16, 8, 8, generator=g) + torch.linspace(-1, 1, 40).view(-1, 1, 1, 1)
    writer = CacheWriter(root / "cache", shard_size=16)
    for i, lat in enumerate(latents):
        writer.add_image(i, lat)
    ctx, pooled = conditioning(4, tokens=5)
    for p in range(4):
        writer.add_prompt(p, ctx[p], pooled[p])
    a, b = torch.randint(40, (64,), generator=g), torch.randint(40, (64,), generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    win, lose = torch.where(a > b, a, b), torch.where(a > b, b, a)
    writer.finish(torch.stack([torch.randint(4, (len(a),), generator=g), win, lose], 1), text={"scheme": "test"})
    return root


def config(world: Path, out: Path, *extra: str, **train) -> TrainDRMConfig:
    overrides = [f"out={json.dumps(str(out))}", f"model.base={json.dumps(str(world / 'base'))}", "model.blocks=2",
                 "model.conv_channels=[16, 16]", "model.groups=4", "model.mlp_hidden=16", "model.dropout=0.1",
                 f"data.cache={json.dumps(str(world / 'cache'))}", "data.eval_fraction=0.25", "train.lr=1e-3",
                 "train.steps=6", "train.batch_size=4", "train.eval_every=3", "train.checkpoint_every=2",
                 "train.log_every=1", "train.sigma_sampling=\"uniform\""]
    overrides += [f"train.{k}={json.dumps(v)}" for k, v in train.items()] + list(extra)
    return load_config(TrainDRMConfig, None, overrides)


def test_inputs_are_checked_before_the_model_is_built(world, tmp_path, monkeypatch):
    """A wrong out, base, cache or resume fails at once, naming the setting, before any weight is read."""
    import training.train_drm as train_drm

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(train_drm, "build_model", no_build)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DRMError, match=r"out = .*a_file/run: cannot write there"):
        train(config(world, tmp_path / "a_file" / "run"))
    with pytest.raises(DRMError, match=r"model.base = .*missing.safetensors: .*no such file"):
        train(config(world, tmp_path / "run", f"model.base={json.dumps(str(tmp_path / 'missing.safetensors'))}"))
    with pytest.raises(DRMError, match="not a preference cache"):
        train(config(world, tmp_path / "run", f"data.cache={json.dumps(str(tmp_path))}"))
    tiny_transformer(joint_attention_dim=2048, pos_embed_max_size=2).save_pretrained(tmp_path / "narrow")
    with pytest.raises(DRMError, match=r"data.cache = .* does not fit model.base = .*narrow: latents 8x8 exceed the "
                                       r"4x4 .*; text embeddings are 4096 / 2048 wide, the model takes context 2048"):
        train(config(world, tmp_path / "run", f"model.base={json.dumps(str(tmp_path / 'narrow'))}"))
    with pytest.raises(DRMError, match="--resume nowhere: not a checkpoint folder"):
        train(config(world, tmp_path / "run"), resume="nowhere")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cache_reads_back(world):
    data = PreferenceCache(world / "cache")
    item = data[0]
    assert item["win"].shape == (16, 8, 8) and item["context"].shape == (5, 4096) and item["pooled"].shape == (2048,)
    assert data.meta["counts"]["images"] == 40 and data.meta["text"] == {"scheme": "test"}


def test_unknown_keys_and_bad_types_are_errors(world):
    with pytest.raises(DRMError, match="unknown key.*'nope'"):
        load_config(TrainDRMConfig, None, ["train.nope=1"])
    with pytest.raises(DRMError, match="unknown key.*'trian'"):
        load_config(TrainDRMConfig, None, ["trian.lr=1"])
    with pytest.raises(DRMError, match="train.steps: expected int"):
        load_config(TrainDRMConfig, None, ["train.steps=many"])
    assert main(["train-drm", "--set", "train.nope=1"]) == 2


def test_resolved_config_round_trips(world, tmp_path):
    cfg = config(world, tmp_path / "run")
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(TrainDRMConfig, path) == cfg


def test_kill_and_resume_is_bit_identical(world, tmp_path):
    full = load_drm(train(config(world, tmp_path / "full")))
    killed = config(world, tmp_path / "killed")
    train(killed, stop_after=3)  # "killed" after step 3 (its checkpoint at step 3 is the newest)
    assert not (tmp_path / "killed" / "drm.safetensors").exists()
    resumed = load_drm(train(killed, resume="latest"))
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert resumed.provenance["eval_accuracy"] == full.provenance["eval_accuracy"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(6) >= 1  # no duplicated history after the resume
    assert len(list((tmp_path / "killed" / "checkpoints").iterdir())) == 3  # rotation keeps 3


def test_training_learns_and_writes_a_drm_with_provenance(world, tmp_path):
    path = train(config(world, tmp_path / "run", steps=30, eval_every=30, checkpoint_every=30))
    drm = load_drm(path)
    assert drm.provenance["trained_steps"] == 30 and drm.provenance["text_encoding"] == {"scheme": "test"}
    assert float(drm.provenance["eval_accuracy"]["0.0"]) >= 0.75  # the brighter latent wins
    assert (tmp_path / "run" / "config.resolved.toml").is_file()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in x]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_random_init_and_continue_from_drm(world, tmp_path):
    rnd = load_drm(train(config(world, tmp_path / "random", 'model.init="random"', steps=2)))
    base = load_drm(train(config(world, tmp_path / "base", steps=2)))
    assert not torch.equal(rnd.state_dict()["context_embedder.weight"], base.state_dict()["context_embedder.weight"])
    assert rnd.provenance["init"] == "random"
    drm_file = json.dumps(str(tmp_path / "base" / "drm.safetensors"))
    cont = load_drm(train(config(world, tmp_path / "cont", 'model.init="drm"', f"model.base={drm_file}", steps=2)))
    assert cont.provenance["init"] == "drm"


def test_eval_command_prints_table_and_json(world, tmp_path, capsys):
    path = train(config(world, tmp_path / "run", steps=2))
    out_json = tmp_path / "acc.json"
    assert main(["eval-drm", "--drm", str(path), "--cache", str(world / "cache"), "--noise-draws", "2",
                 "--json", str(out_json)]) == 0
    assert "| sigma | 0 | 0.25 | 0.5 | 0.75 |" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert set(result["accuracy"]) == {"0.0", "0.25", "0.5", "0.75"} and result["pairs"] > 0


@pytest.mark.skipif(not HAVE_TORCHRUN, reason="torchrun not installed")
def test_two_processes_match_one_process(world, tmp_path):
    """2 processes with half the batch each see the same global batch as one process."""
    one = load_drm(train(config(world, tmp_path / "one", "model.dropout=0.0")))
    torchrun("train-drm", config(world, tmp_path / "two", "model.dropout=0.0"), tmp_path)
    two = load_drm(tmp_path / "two" / "drm.safetensors")
    assert two.provenance["processes"] == 2 and one.provenance["processes"] == 1
    assert two.provenance["eval_accuracy"] == one.provenance["eval_accuracy"]

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    assert losses("one") == pytest.approx(losses("two"), rel=1e-5)  # all-reduce order: float noise only
    # Adam divides by sqrt(v): on parameters whose gradient is ~0 that float noise becomes a step of
    # up to lr, so weights agree to a few lr-sized steps, not to 1e-6.
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v, rtol=0, atol=6 * 1e-3, msg=k)
