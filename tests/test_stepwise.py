import pytest
import torch

from drm_core import DRMError, branch_mask, flow_sigmas, sde_sample, stepwise_sample


def field(target):
    """Analytic velocity of a flow whose data is the single point `target`."""
    return lambda x, sigma: (x - target) / sigma


def test_k1_equals_plain_sde_sampling():
    target = torch.randn(1, 16, 4, 4)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(8)
    plain = sde_sample(field(target), x, sigmas, 0.7, torch.Generator().manual_seed(5))
    calls = []
    res = stepwise_sample(field(target), lambda c, s: calls.append(c) or c.sum((1, 2, 3)), x, sigmas, k=1,
                          noise_level=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(res.latent, plain) and not calls


def test_one_velocity_and_one_reward_call_per_step_with_batch_times_k():
    target = torch.zeros(1, 16, 2, 2)
    velocity_calls, reward_batches = [], []

    def velocity(x, sigma):
        velocity_calls.append(x.shape[0])
        return (x - target) / sigma

    def reward(c, sigma):
        reward_batches.append((c.shape[0], float(sigma)))
        return -c.flatten(1).pow(2).mean(1)

    sigmas = flow_sigmas(6)
    res = stepwise_sample(velocity, reward, torch.randn(3, 16, 2, 2), sigmas, k=4,
                          generator=torch.Generator().manual_seed(0))
    assert velocity_calls == [3] * 6
    assert [b for b, _ in reward_batches] == [12] * 5  # the last step lands on x0, no branching
    assert [s for _, s in reward_batches] == pytest.approx(sigmas[1:-1].tolist())  # scored at the next sigma
    assert [r.branched for r in res.trace] == [True] * 5 + [False]


def test_selection_is_argmax_per_image():
    chosen_scores = []

    def reward(c, sigma):
        scores = c.flatten(1).mean(1)
        chosen_scores.append(scores.view(2, 3).max(1).values)
        return scores

    res = stepwise_sample(lambda x, s: torch.zeros_like(x), reward, torch.zeros(2, 16, 2, 2), flow_sigmas(3), k=3,
                          generator=torch.Generator().manual_seed(0))
    for record, best in zip(res.trace, chosen_scores):
        torch.testing.assert_close(record.score, best)
        assert (record.margin >= 0).all() and record.chosen.shape == (2,)


def test_batch_images_are_independent():
    """Image 1's path is unaffected by what image 0 is (B x k candidates, per-image argmax)."""
    target = torch.randn(1, 16, 2, 2)
    reward = lambda c, s: -(c - target).flatten(1).pow(2).mean(1)  # noqa: E731
    x = torch.randn(2, 16, 2, 2)
    a = stepwise_sample(field(target), reward, x, flow_sigmas(5), k=3, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[0] = torch.randn(16, 2, 2)
    b = stepwise_sample(field(target), reward, x2, flow_sigmas(5), k=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.latent[1], b.latent[1])


def gaussian_field(x, sigma):
    """Exact velocity when the data is N(0, I): x0_hat = (1 - s) x / ((1 - s)^2 + s^2)."""
    x0_hat = (1 - sigma) * x / ((1 - sigma) ** 2 + sigma**2)
    return (x - x0_hat) / sigma


def test_selection_raises_the_reward():
    goal = torch.full((1, 16, 4, 4), 0.5)
    reward = lambda c, s: -(c - goal * (1 - s)).flatten(1).pow(2).mean(1)  # noqa: E731
    x = torch.randn(64, 16, 4, 4, generator=torch.Generator().manual_seed(0))

    def final_reward(k):
        out = stepwise_sample(gaussian_field, reward, x, flow_sigmas(10), k=k, noise_level=1.0,
                              generator=torch.Generator().manual_seed(3)).latent
        return reward(out, torch.tensor(0.0)).mean()

    assert final_reward(1) < final_reward(2) < final_reward(6)


def test_branch_mask_options():
    assert branch_mask(10) == [True] * 10
    assert branch_mask(10, (0.0, 0.5)) == [True] * 5 + [False] * 5
    assert branch_mask(10, every=3) == [i % 3 == 0 for i in range(10)]
    with pytest.raises(DRMError, match="branch_range"):
        branch_mask(10, (0.6, 0.2))


def test_plain_steps_outside_the_branch_range_can_be_ode():
    calls = []
    res = stepwise_sample(lambda x, s: torch.zeros_like(x), lambda c, s: calls.append(1) or c.mean((1, 2, 3)),
                          torch.zeros(1, 16, 2, 2), flow_sigmas(4), k=2, branch_range=(0.0, 0.5),
                          plain_noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and [r.branched for r in res.trace] == [True, True, False, False]


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_k_is_named(k):
    with pytest.raises(DRMError, match="k \\(candidates"):
        stepwise_sample(lambda x, s: x, lambda c, s: c.mean((1, 2, 3)), torch.zeros(1, 16, 2, 2), flow_sigmas(2), k=k)


def test_bad_schedule_is_named():
    with pytest.raises(DRMError, match="sigmas must lie"):
        stepwise_sample(lambda x, s: x, lambda c, s: c, torch.zeros(1, 16, 2, 2), torch.tensor([1.5, 0.0]), k=2)


class _DeviceTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records copies between devices and host reads of non-CPU tensors (each a sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            devices = {t.device.type for t in tensors + outs}
            if len(devices) > 1:
                self.events.append(f"{func} between {sorted(devices)} of shape {tuple(tensors[-1].shape)}")
        if func is torch.ops.aten._local_scalar_dense.default and tensors[0].device.type != "cpu":
            self.events.append(f"host read of a {tensors[0].device.type} tensor")
        return out


@pytest.mark.parametrize("options", [{}, dict(branch_range=(0.0, 0.5), plain_noise_level=0.0)])
def test_the_loop_neither_copies_between_host_and_device_nor_waits_for_the_device(monkeypatch, options):
    # Latents on the meta device stand in for an accelerator: a host read of a meta tensor raises, and any
    # copy between the host and the device is recorded. The trace goes to the host after the loop.
    import drm_core.stepwise as stepwise

    from drm_core import drm_from_base
    from tiny import TINY_HEAD, conditioning, tiny_transformer

    monkeypatch.setattr(stepwise, "_to_host", lambda trace: trace)
    drm = drm_from_base(tiny_transformer().state_dict(), blocks=1, **TINY_HEAD).eval().to("meta")
    context, pooled = (t.to("meta") for t in conditioning(2))
    x = torch.empty(2, 16, 8, 8, device="meta")
    with torch.inference_mode(), _DeviceTraffic() as traffic:
        prompt = drm.embed_prompt(context, pooled)
        res = stepwise_sample(lambda z, sigma: z * 0.5, lambda c, sigma: drm.score_embedded(c, sigma, prompt), x,
                              flow_sigmas(6), k=4, noise_level=0.7, **options)
    assert res.latent.device.type == "meta" and traffic.events == []
