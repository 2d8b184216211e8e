"""Value training (training/value.py, `train-drm` with value.generator): sibling pairs on the generator's own
trajectories, labelled by a teacher DRM's preference between the images they lead to."""

import json

import pytest
import torch
from safetensors.torch import save_file

from drm_core import DRMError, drm_from_base, flow_sigmas, load_drm, save_drm
from training.config import load_config
from training.grpo_inputs import PromptSection
from training.train_drm import TrainDRMConfig, train
from training.value import sibling_pairs, soft_bradley_terry_loss, teacher_preference
from tiny import TINY_HEAD, conditioning, tiny_transformer


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_velocity(x, sigma, rows):
    """Exact flow velocity for data ~ N(0, I): x_s = (1 - s) x0 + s eps gives v = x (2s - 1) / ((1 - s)^2 + s^2)."""
    s = float(sigma)
    return x * (2 * s - 1) / ((1 - s) ** 2 + s ** 2)


def total(images, rows):
    return images.flatten(1).sum(1)


def test_siblings_share_a_parent_and_the_ode_label_follows_the_state():
    """With the exact Gaussian flow every Euler ODE step scales x by one positive factor, so a completed image is
    c(s) x_s: a teacher that likes a large sum prefers the sibling whose state has the larger sum, which is what the
    student is taught."""
    sigmas, rows = flow_sigmas(6), torch.arange(64)
    for j in (0, 2, 4):
        g = torch.Generator().manual_seed(j)
        p = sibling_pairs(gaussian_velocity, total, rows, (2, 3, 3), sigmas, j, 0.8, g, completion="ode",
                          labels="hard")
        assert p.sigma == pytest.approx(float(sigmas[j + 1])) and p.a.shape == (64, 2, 3, 3)
        assert not torch.equal(p.a, p.b)
        state = total(p.a, rows) > total(p.b, rows)
        assert torch.equal(p.label, state.float())
        factor = p.teacher[0] / total(p.a, rows)  # c(s): one positive number for every row
        assert factor.min() > 0 and torch.allclose(factor, factor.median().expand_as(factor), rtol=1e-3)
    soft = sibling_pairs(gaussian_velocity, total, rows, (2, 3, 3), sigmas, 1, 0.8, torch.Generator().manual_seed(0),
                         completion="ode")
    assert torch.allclose(soft.label, torch.sigmoid(soft.teacher[0] - soft.teacher[1]))


def test_sde_completions_are_noisy_labels_of_the_same_states():
    """SDE completion: the same siblings (same seed) get other images, hence labels that agree with the state only
    in expectation; the siblings themselves do not depend on the completion."""
    sigmas, rows = flow_sigmas(6), torch.arange(256)
    ode = sibling_pairs(gaussian_velocity, total, rows, (1, 2, 2), sigmas, 1, 0.8, torch.Generator().manual_seed(3),
                        completion="ode", labels="hard")
    sde = sibling_pairs(gaussian_velocity, total, rows, (1, 2, 2), sigmas, 1, 0.8, torch.Generator().manual_seed(3),
                        completion="sde", labels="hard")
    assert torch.equal(ode.a, sde.a) and torch.equal(ode.b, sde.b)
    agree = (ode.label == sde.label).float().mean()
    assert 0.55 < agree < 1.0


def test_processes_see_the_pairs_of_one_process():
    """Noise is drawn for the global batch and sliced, so two processes' halves are the single process's batch."""
    sigmas, rows = flow_sigmas(5), torch.arange(8) % 3
    full = sibling_pairs(gaussian_velocity, total, rows, (1, 2, 2), sigmas, 2, 0.7, torch.Generator().manual_seed(1))
    halves = [sibling_pairs(gaussian_velocity, total, rows, (1, 2, 2), sigmas, 2, 0.7,
                            torch.Generator().manual_seed(1), local=part) for part in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat([h.a for h in halves]), full.a)
    assert torch.equal(torch.cat([h.b for h in halves]), full.b)
    assert torch.equal(torch.cat([h.label for h in halves]), full.label)
    assert torch.equal(torch.cat([h.rows for h in halves]), rows)


def test_sibling_step_and_labels_are_checked():
    with pytest.raises(DRMError, match=r"sibling step j must be in \[0, 2\] for a 4-step schedule, got 3"):
        sibling_pairs(gaussian_velocity, total, torch.arange(2), (1, 2, 2), flow_sigmas(4), 3, 0.7,
                      torch.Generator())
    a, b = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    assert torch.equal(teacher_preference(a, b, "hard"), torch.tensor([1.0, 0.0, 0.5]))
    hard = soft_bradley_terry_loss(a, b, torch.ones(3))
    assert hard == pytest.approx(float(-torch.nn.functional.logsigmoid(a - b).mean()), abs=1e-6)  # eq. 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny generator, a teacher DRM made from it and 6 encoded prompts plus the negative."""
    root = tmp_path_factory.mktemp("value")
    tiny_transformer().save_pretrained(root / "base")
    save_drm(drm_from_base(root / "base", blocks=2, **TINY_HEAD), root / "teacher.safetensors")
    ctx, pooled = conditioning(7, tokens=5)
    (root / "prompts").mkdir()
    save_file({"context": ctx[:6], "pooled": pooled[:6], "negative_context": ctx[6:], "negative_pooled": pooled[6:]},
              root / "prompts" / "prompt_embeddings.safetensors", {"negative": PromptSection().negative})
    return root


def config(world, out, *extra):
    q = json.dumps
    return load_config(TrainDRMConfig, None, [
        f"out={q(str(out))}", 'model.init="drm"', f"model.base={q(str(world / 'teacher.safetensors'))}",
        f"value.generator={q(str(world / 'base'))}", "value.steps=4", "value.resolution=64", "value.cfg_scale=2.0",
        "value.eval_pairs_per_step=1", f"prompts.cache={q(str(world / 'prompts'))}", "prompts.eval_prompts=2",
        "train.steps=4", "train.batch_size=2", "train.lr=1e-3", "train.eval_every=2", "train.checkpoint_every=1",
        "train.log_every=1", *extra])


def test_value_training_continues_the_teacher_and_resumes_exactly(world, tmp_path):
    """model.init = drm continues the teacher on rollouts; held-out agreement is logged before and during training;
    a killed run resumed from its checkpoint ends with the uninterrupted run's weights."""
    final = train(config(world, tmp_path / "whole"))
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/value_acc" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["eval/value_acc"] <= 1 for r in evals)
    assert sum(k.startswith("eval/value_acc_sigma_") for k in evals[0]) == 3  # every sibling step of 4
    assert all("loss" in r for r in rows if r["step"] > 0 and "eval/value_acc" not in r)
    drm = load_drm(final)
    assert drm.provenance["train_data"] == "value rollouts" and "value" in drm.provenance["eval_accuracy"]
    teacher = load_drm(world / "teacher.safetensors")
    assert any(not torch.equal(a, b) for a, b in zip(drm.state_dict().values(), teacher.state_dict().values()))

    train(config(world, tmp_path / "killed"), stop_after=2)
    resumed = load_drm(train(config(world, tmp_path / "killed"), resume="latest"))
    for name, value in drm.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_value_inputs_are_named(world, tmp_path):
    q = json.dumps
    with pytest.raises(DRMError, match=r"value.teacher is empty"):
        train(config(world, tmp_path / "a", 'model.init="base"', f"model.base={q(str(world / 'base'))}",
                     "model.blocks=2"))
    with pytest.raises(DRMError, match=r"value.generator = .*nowhere"):
        train(config(world, tmp_path / "b", f"value.generator={q(str(tmp_path / 'nowhere'))}"))
    with pytest.raises(DRMError, match=r"value training needs prompts"):
        train(config(world, tmp_path / "c", 'prompts.cache=""'))
    with pytest.raises(DRMError, match=r"value.completion must be sde or ode"):
        train(config(world, tmp_path / "d", 'value.completion="mc"'))
    with pytest.raises(DRMError, match=r"value.teacher = .*base: a folder, not a DRM file"):
        train(config(world, tmp_path / "e", f"value.teacher={q(str(world / 'base'))}"))


def test_the_shipped_value_config_loads():
    from pathlib import Path

    path = Path(__file__).parent.parent / "training" / "configs" / "drm_value_sd35m_512.toml"
    cfg = load_config(TrainDRMConfig, path)
    assert cfg.model.init == "drm" and cfg.value.generator.endswith("sd3.5_medium.safetensors")
    assert cfg.value.completion == "ode" and cfg.prompts.eval_prompts == 16
