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


def test_one_forward_gives_all_k_log_probs_with_the_k_forward_gradient():
    """Step-GRPO: k candidates share a parent, so one velocity evaluation serves all k (same gradient)."""
    from drm_core import candidate_log_probs, sde_log_prob, sde_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(2, 16, 2, 2)
    velocity = lambda x: layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731
    k = 4
    with torch.no_grad():
        step = sde_step(x.repeat_interleave(k, 0), velocity(x).repeat_interleave(k, 0), 0.8, 0.7, 0.7)
    candidates = step.sample.view(2, k, 16, 2, 2)
    adv = torch.randn(2, k)

    one = sde_step(x, velocity(x), 0.8, 0.7, 0.7, noise=torch.zeros_like(x))
    loss_one = -(candidate_log_probs(candidates, one.mean, one.std) * adv).mean()
    grad_one = torch.autograd.grad(loss_one, layer.weight)[0]

    logps = []
    for j in range(k):  # the naive way: one policy forward per candidate
        s = sde_step(x, velocity(x), 0.8, 0.7, 0.7, noise=torch.zeros_like(x))
        logps.append(sde_log_prob(candidates[:, j], s.mean, s.std))
    loss_k = -(torch.stack(logps, 1) * adv).mean()
    grad_k = torch.autograd.grad(loss_k, layer.weight)[0]
    torch.testing.assert_close(loss_one, loss_k)
    torch.testing.assert_close(grad_one, grad_k, rtol=1e-5, atol=1e-7)


def test_policy_cfg_uses_the_given_negative_and_zeros_by_default():
    """v = v_neg + cfg * (v_cond - v_neg), the negative [1, N, 4096] / [1, 2048] broadcast over the batch."""
    import pytest

    from drm_core import DRMError
    from tiny import conditioning, tiny_transformer
    from training.grpo_core import Policy

    model = tiny_transformer(num_layers=1, dual_attention_layers=())
    ctx, pooled = conditioning(3, tokens=5)
    neg_ctx, neg_pooled = conditioning(1, tokens=5, seed=7)
    x, rows, sigma = torch.randn(2, 16, 4, 4), torch.tensor([2, 0]), 0.6
    t = torch.full((2,), 600.0)

    def v(c, p):
        with torch.no_grad():
            return model(x, c, p, t).sample

    v_cond = v(ctx[rows], pooled[rows])
    with torch.no_grad():
        given = Policy(model, ctx, pooled, 4.5, neg_ctx, neg_pooled).velocity(x, sigma, rows)
        zeroed = Policy(model, ctx, pooled, 4.5).velocity(x, sigma, rows)
    v_neg = v(neg_ctx.expand(2, -1, -1), neg_pooled.expand(2, -1))
    torch.testing.assert_close(given, v_neg + 4.5 * (v_cond - v_neg), rtol=1e-4, atol=1e-5)
    v_zero = v(torch.zeros(2, 5, 4096), torch.zeros(2, 2048))
    torch.testing.assert_close(zeroed, v_zero + 4.5 * (v_cond - v_zero), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(given, zeroed)
    with pytest.raises(DRMError, match="negative_context must be"):
        Policy(model, ctx, pooled, 4.5, torch.zeros(1, 154, 4096), neg_pooled)


def test_step_grpo_trains_only_steps_below_train_sigma_max():
    """Steps above train_sigma_max take one plain SDE step: no DRM call, no transition to train on."""
    from drm_core import flow_sigmas
    from tiny import conditioning, tiny_transformer
    from training.grpo_core import Policy, rollout_step_grpo

    model = tiny_transformer(num_layers=1, dual_attention_layers=())
    ctx, pooled = conditioning(3, tokens=5)
    policy, sigmas, scored = Policy(model, ctx, pooled, 1.0), flow_sigmas(10), []

    def reward(latents, sigma, rows):
        scored.append(float(sigma))
        return latents.flatten(1).mean(1)

    with torch.no_grad():
        x0, transitions = rollout_step_grpo(policy, reward, torch.randn(2, 16, 4, 4), torch.tensor([0, 2]), sigmas, 3,
                                            0.7, torch.Generator().manual_seed(0), train_sigma_max=0.6)
    kept = [s for s in sigmas[:-2].tolist() if s <= 0.6]  # the last step lands on x0 and is never scored
    assert [t.sigma for t in transitions] == kept and len(kept) == 2
    assert scored == [t.sigma_next for t in transitions]
    assert x0.shape == (2, 16, 4, 4) and torch.isfinite(x0).all()
    with torch.no_grad():
        _, every = rollout_step_grpo(policy, reward, torch.randn(2, 16, 4, 4), torch.tensor([0, 2]), sigmas, 3, 0.7,
                                     torch.Generator().manual_seed(0))
    assert len(every) == 9


def test_prompt_alignment_prefers_the_prompt_a_sample_was_made_for():
    """Base model = exact flow of one data point per prompt: samples of prompt c are aligned with c and not with
    the others; the alignment of a sample drawn for another prompt is negative."""
    from training.alignment import AlignmentGuard, contrast_rows, prompt_alignment

    targets = torch.randn(4, 16, 2, 2, generator=torch.Generator().manual_seed(1))  # one data point per prompt

    def velocity(x, sigma, rows):  # the exact velocity of x_sigma = (1 - sigma) target + sigma eps
        return (x - targets[rows]) / sigma

    rows = torch.tensor([0, 1, 2, 3, 0, 1])
    others = contrast_rows(rows, 2)
    assert others.shape == (2, 6) and not (others == rows).any()
    right = prompt_alignment(velocity, targets[rows], rows, n_contrast=3)
    wrong = prompt_alignment(velocity, targets[(rows + 1) % 4], rows, n_contrast=3)
    assert (right > 0).all() and (wrong < 0).all()
    torch.testing.assert_close(right, prompt_alignment(velocity, targets[rows], rows, n_contrast=3))  # fixed noise
    guard = AlignmentGuard(base_alignment=2.0, tolerance=0.1)
    assert guard.ok(1.85) and not guard.ok(1.75)
