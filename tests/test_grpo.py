import torch

from drm_core import clipped_policy_loss, gaussian_kl, group_advantages


def test_group_advantages_normalise_each_group_and_guard_zero_std():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages(r)
    torch.testing.assert_close(a[0], (r[0] - 2.5) / r[0].std(unbiased=False))
    assert torch.equal(a[1], torch.zeros(4))


def test_clipped_loss_matches_ppo_and_gradient_sign():
    logp_old = torch.zeros(4)
    logp = torch.tensor([0.0, 1e-5, -1e-5, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    out = clipped_policy_loss(logp, logp_old, adv, clip_range=1e-4)
    ratio = logp.detach().exp()
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert logp.grad[0] < 0 and logp.grad[3] == 0  # clipped sample gets no gradient
    assert out.clip_fraction.item() == 0.25


def test_kl_is_closed_form_gaussian_kl():
    m, mr, s = torch.randn(3, 16, 2, 2), torch.randn(3, 16, 2, 2), torch.full((3, 1, 1, 1), 0.3)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(m, s), torch.distributions.Normal(mr, s))
    torch.testing.assert_close(gaussian_kl(m, mr, s), exact.mean((1, 2, 3)))
