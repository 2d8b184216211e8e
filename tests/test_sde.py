import math

import pytest
import torch

from drm_core import DRMError, flow_sigmas, sde_log_prob, sde_sample, sde_step
from drm_core.latents import add_noise, shift_sigma, to_model_space, to_raw_space, unshift_sigma


def test_noise_level_zero_is_exactly_euler():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    for sigma, sigma_next in [(1.0, 0.9), (0.6, 0.45), (0.2, 0.05)]:
        out = sde_step(x, v, sigma, sigma_next, noise_level=0.0, generator=g)
        euler = x + torch.tensor(sigma_next - sigma, dtype=torch.float32) * v
        dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
        assert torch.equal(out.sample, x + v * dt)
        torch.testing.assert_close(out.sample, euler, rtol=0, atol=1e-6)


def test_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    step = sde_step(x, v, 0.7, 0.6, noise_level=0.7, generator=g)
    expected = torch.distributions.Normal(step.mean, step.std).log_prob(step.sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(sde_log_prob(step.sample, step.mean, step.std), expected, rtol=1e-6, atol=1e-6)


def test_mean_and_std_follow_eq6():
    x, v = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -0.5)
    sigma, nxt, a = 0.6, 0.5, 0.7
    std_t = a * math.sqrt(sigma / (1 - sigma))
    eps_hat = 0.3 + (1 - sigma) * -0.5
    mean = 0.3 + (-0.5 + std_t**2 / (2 * sigma) * eps_hat) * (nxt - sigma)
    step = sde_step(x, v, sigma, nxt, a, noise=torch.zeros(1, 1, 1, 1))
    assert step.mean.item() == pytest.approx(mean, rel=1e-6)
    assert step.std.item() == pytest.approx(std_t * math.sqrt(sigma - nxt), rel=1e-6)


def test_sigma_one_uses_next_sigma_like_flow_grpo():
    x, v = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    step = sde_step(x, v, 1.0, 0.95, 0.7, noise=torch.zeros(1, 1, 1, 1))
    assert torch.isfinite(step.std).all()
    assert step.std_t.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.95)), rel=1e-6)
    # the tempting clamp to 0.999 would inject ~sqrt(0.05 / 0.001) = 7x the std, ~50x the variance
    assert 0.7 * math.sqrt(1 / 0.001) / step.std_t.item() > 7


def test_last_step_returns_x0_and_float32_inside():
    x, v = torch.randn(2, 16, 4, 4).bfloat16(), torch.randn(2, 16, 4, 4).bfloat16()
    step = sde_step(x, v, 0.3, 0.0, 0.7)
    assert step.sample.dtype == torch.bfloat16 and step.mean.dtype == torch.float32
    torch.testing.assert_close(step.mean, x.float() - 0.3 * v.float())
    assert torch.all(step.std == 0)


def test_per_sample_sigma():
    x, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    both = sde_step(x, v, torch.tensor([0.8, 0.4]), torch.tensor([0.7, 0.3]), 0.5, noise=torch.zeros_like(x))
    one = sde_step(x[1:], v[1:], 0.4, 0.3, 0.5, noise=torch.zeros_like(x[1:]))
    torch.testing.assert_close(both.mean[1:], one.mean)


def test_ode_sampling_of_a_straight_flow_recovers_x0():
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    out = sde_sample(lambda x, s: noise - x0, noise.clone(), flow_sigmas(5), noise_level=0.0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=1.2, sigma_next=0.5), "sigma must lie in"),
    (dict(sigma=0.5, sigma_next=-0.1), "sigma_next must lie in"),
    (dict(sigma=0.4, sigma_next=0.5), "sigma_next <= sigma"),
    (dict(sigma=0.5, sigma_next=0.4, noise_level=-1.0), "noise_level"),
])
def test_bad_arguments_are_named(kwargs, match):
    x = torch.zeros(1, 16, 2, 2)
    kwargs.setdefault("noise_level", 0.7)
    with pytest.raises(DRMError, match=match):
        sde_step(x, x, **kwargs)


def test_latent_spaces_and_schedule():
    raw = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(to_raw_space(to_model_space(raw)), raw)
    torch.testing.assert_close(to_model_space(torch.full((1,), 0.0609)), torch.zeros(1))
    s = flow_sigmas(4)
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])
    t = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(unshift_sigma(shift_sigma(t)), t)
    assert shift_sigma(0.5).item() == pytest.approx(1.5 / 2.0)
    x0, n = torch.randn(2, 1, 1, 1), torch.randn(2, 1, 1, 1)
    torch.testing.assert_close(add_noise(x0, n, torch.tensor([0.0, 1.0])), torch.stack([x0[0], n[1]]))
