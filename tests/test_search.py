"""Search beyond the greedy argmax in stepwise_sample (issue 15): beam search and SMC (Feynman-Kac) steering."""

import math

import pytest
import torch

from drm_core import DRMError, SearchOptions, flow_sigmas, sde_sample, stepwise_sample


def gaussian_field(x, sigma):
    """Exact velocity when the data is N(0, I): x0_hat = (1 - s) x / ((1 - s)^2 + s^2)."""
    x0_hat = (1 - sigma) * x / ((1 - sigma) ** 2 + sigma**2)
    return (x - x0_hat) / sigma


def goal_reward(c, sigma):
    """Higher nearer a constant image that fades in as sigma -> 0."""
    return -(c - 0.5 * (1 - sigma)).flatten(1).pow(2).mean(1)


def run(seed=0, batch=3, steps=6, **options):
    x = torch.randn(batch, 16, 2, 2, generator=torch.Generator().manual_seed(100))
    return stepwise_sample(gaussian_field, goal_reward, x, flow_sigmas(steps), noise_level=0.8,
                           generator=torch.Generator().manual_seed(seed), **options)


def test_argmax_is_the_default_and_equals_a_beam_of_one():
    default = run(k=4)
    explicit = run(k=4, selection="argmax", particles=1)
    beam = run(k=4, selection="beam", particles=1)
    assert torch.equal(default.latent, explicit.latent) and torch.equal(default.latent, beam.latent)
    for a, b in zip(default.trace, beam.trace):
        assert a.branched == b.branched and (not a.branched or torch.equal(a.chosen, b.chosen))
    assert all(r.ess is None and r.resampled is None for r in default.trace)


def test_smc_at_temperature_zero_is_argmax_over_all_children():
    """N copies of the best child, no random draw: the same stream as argmax with N * k candidates."""
    smc = run(k=3, selection="smc", particles=2, temperature=0.0)
    argmax = run(k=6)
    assert torch.equal(smc.latent, argmax.latent)
    scored = [r for r in smc.trace if r.branched]
    assert all(torch.allclose(r.ess, torch.full((3,), 1 / 6)) and r.resampled.all() for r in scored)


@pytest.mark.parametrize("selection", ["smc", "beam"])
def test_one_velocity_call_per_step_on_all_particles_and_one_reward_call_on_all_children(selection):
    velocity_rows, reward_rows = [], []

    def velocity(x, sigma):
        velocity_rows.append(x.shape[0])
        return gaussian_field(x, sigma)

    def reward(c, sigma):
        reward_rows.append(c.shape[0])
        return goal_reward(c, sigma)

    callback_rows = []
    res = stepwise_sample(velocity, reward, torch.randn(3, 16, 2, 2), flow_sigmas(6), k=3, selection=selection,
                          particles=2, generator=torch.Generator().manual_seed(0),
                          callback=lambda i, x, d: callback_rows.append((x.shape[0], d.shape[0])))
    # the first scored step branches the one path per image; the last keeps each image's best child
    assert velocity_rows == [3, 6, 6, 6, 6, 3]
    assert reward_rows == [3 * 2 * 3] * 5
    assert callback_rows == [(3, 3)] * 6 and res.latent.shape == (3, 16, 2, 2)


def test_branch_window_limits_the_particles_and_plain_steps_between_run_on_all_of_them():
    velocity_rows = []

    def velocity(x, sigma):
        velocity_rows.append(x.shape[0])
        return gaussian_field(x, sigma)

    stepwise_sample(velocity, goal_reward, torch.randn(2, 16, 2, 2), flow_sigmas(8), k=1, selection="smc",
                    particles=4, branch_steps=[False, True, False, True, False, False, False, False],
                    plain_noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert velocity_rows == [2, 2, 8, 8, 2, 2, 2, 2]


@pytest.mark.parametrize("selection", ["smc", "beam"])
def test_one_child_and_one_particle_is_plain_sde_sampling(selection):
    x = torch.randn(2, 16, 2, 2)
    plain = sde_sample(gaussian_field, x, flow_sigmas(5), 0.7, torch.Generator().manual_seed(4))
    calls = []
    res = stepwise_sample(gaussian_field, lambda c, s: calls.append(1) or goal_reward(c, s), x, flow_sigmas(5),
                          k=1, selection=selection, generator=torch.Generator().manual_seed(4))
    assert torch.equal(res.latent, plain) and not calls


def test_beam_keeps_the_top_children_of_each_image_in_order():
    """The next step's velocity input (the kept particles) is each image's top-N children, best first."""
    parents, children = [], []

    def velocity(x, sigma):
        parents.append(x)
        return gaussian_field(x, sigma)

    def reward(c, sigma):
        children.append((c, goal_reward(c, sigma)))
        return children[-1][1]

    stepwise_sample(velocity, reward, torch.randn(2, 16, 2, 2), flow_sigmas(5), k=2, selection="beam", particles=3,
                    noise_level=0.8, generator=torch.Generator().manual_seed(0))
    for (c, scores), kept in zip(children[:-1], parents[1:]):
        top = scores.view(2, 6).topk(3, dim=1).indices
        assert torch.equal(kept, c.view(2, 6, 16, 2, 2)[torch.arange(2).unsqueeze(1), top].flatten(0, 1))


def test_smc_at_infinite_temperature_ignores_the_scores_until_the_final_pick():
    """Uniform weights: every particle set up to the last scored step is the same whatever the reward says."""
    inputs = {}
    for name, sign in (("reward", 1.0), ("negated", -1.0)):
        seen = inputs[name] = []
        stepwise_sample(gaussian_field, lambda c, s, seen=seen, sign=sign: seen.append(c) or sign * goal_reward(c, s),
                        torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(1)), flow_sigmas(6), k=2,
                        selection="smc", particles=3, temperature=math.inf, noise_level=0.8,
                        generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(inputs["reward"], inputs["negated"]))
    tempered = []
    stepwise_sample(gaussian_field, lambda c, s: tempered.append(c) or -goal_reward(c, s) / 1e-3,
                    torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(1)), flow_sigmas(6), k=2,
                    selection="smc", particles=3, temperature=1.0, noise_level=0.8,
                    generator=torch.Generator().manual_seed(2))
    assert not all(torch.equal(a, b) for a, b in zip(inputs["reward"], tempered))


def test_smc_without_resampling_carries_the_weights():
    """ess_threshold 0 and k = 1: each particle keeps its own child; with the difference potential the weights
    telescope to exp(score at the last scored step / T), whose ESS the trace reports."""
    scores = []
    res = stepwise_sample(gaussian_field, lambda c, s: scores.append(goal_reward(c, s)) or scores[-1] * 40,
                          torch.randn(2, 16, 2, 2), flow_sigmas(6), k=1, selection="smc", particles=4,
                          temperature=2.0, ess_threshold=0.0, noise_level=0.8,
                          generator=torch.Generator().manual_seed(0))
    last = torch.softmax(scores[-1].view(2, 4) * 40 / 2.0, dim=1)
    scored = [r for r in res.trace if r.branched]
    assert not any(r.resampled.any() for r in scored)
    torch.testing.assert_close(scored[-1].ess, 1 / last.square().sum(1) / 4)


def test_smc_resamples_only_below_the_ess_threshold():
    res = run(k=2, selection="smc", particles=4, temperature=0.002, ess_threshold=0.5, steps=8)
    for r in (r for r in res.trace if r.branched):
        assert torch.equal(r.resampled, r.ess < 0.5)
    assert any(r.resampled.any() for r in res.trace if r.branched)


@pytest.mark.parametrize("options", [dict(selection="smc", resampling="systematic", ess_threshold=0.5),
                                     dict(selection="smc", resampling="multinomial"), dict(selection="beam")])
def test_seeded_runs_repeat_and_other_seeds_differ(options):
    a, b, c = (run(seed=s, k=2, particles=3, temperature=0.01, **options) for s in (7, 7, 8))
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)
    assert all(not r.branched or torch.equal(r.chosen, q.chosen) for r, q in zip(a.trace, b.trace))


@pytest.mark.parametrize("selection", ["smc", "beam"])
def test_batch_images_are_independent(selection):
    x = torch.randn(2, 16, 2, 2)
    x2 = x.clone()
    x2[0] = torch.randn(16, 2, 2)
    a, b = (stepwise_sample(gaussian_field, goal_reward, z, flow_sigmas(5), k=2, selection=selection, particles=3,
                            temperature=0.01, generator=torch.Generator().manual_seed(1)) for z in (x, x2))
    torch.testing.assert_close(a.latent[1], b.latent[1])


def test_trace_names_the_best_kept_child_and_its_margin_over_the_others():
    captured = []
    res = stepwise_sample(gaussian_field, lambda c, s: captured.append(goal_reward(c, s)) or captured[-1],
                          torch.randn(2, 16, 2, 2), flow_sigmas(5), k=2, selection="smc", particles=3,
                          temperature=0.01, generator=torch.Generator().manual_seed(0))
    for record, scores in zip((r for r in res.trace if r.branched), captured):
        scores = scores.view(2, 6)
        torch.testing.assert_close(record.score, scores[torch.arange(2), record.chosen])
        others = scores.scatter(1, record.chosen.unsqueeze(1), -math.inf).amax(1)
        torch.testing.assert_close(record.margin, record.score - others)


def test_search_raises_the_reward_at_equal_reward_evaluations():
    """On the analytic Gaussian flow every search beats plain SDE sampling at N * k = 6 children per image and step;
    when early scores are noisy (as the toy DRM's are at high sigma, docs/search.md), keeping several paths (beam)
    beats committing to the argmax at the same number of reward evaluations."""
    x = torch.randn(128, 16, 4, 4, generator=torch.Generator().manual_seed(0))

    def final(noise_scale, **options):
        total = 0.0
        for seed in range(4):
            g = torch.Generator().manual_seed(1000 + seed)
            scores = (lambda c, s: goal_reward(c, s) + noise_scale * float(s) * torch.randn(len(c), generator=g))
            out = stepwise_sample(gaussian_field, scores, x, flow_sigmas(10), noise_level=1.0,
                                  generator=torch.Generator().manual_seed(seed), **options).latent
            total += float(goal_reward(out, torch.tensor(0.0)).mean()) / 4
        return total

    plain = final(0.0, k=1)
    for options in (dict(k=6), dict(k=3, selection="beam", particles=2),
                    dict(k=2, selection="smc", particles=3, temperature=0.01)):
        assert final(0.0, **options) > plain + 0.1, options
    assert final(0.3, k=2, selection="beam", particles=3) > final(0.3, k=6) + 0.005


@pytest.mark.parametrize("option, value, message", [
    ("selection", "greedy", "selection must be one of argmax, smc, beam, got 'greedy'"),
    ("particles", 0, "particles \\(paths kept per image\\) must be an integer >= 1, got 0"),
    ("particles", 2.0, "particles .* must be an integer >= 1, got 2.0"),
    ("temperature", -1.0, "temperature must be a number >= 0"),
    ("temperature", math.nan, "temperature must be a number >= 0"),
    ("ess_threshold", 1.5, "ess_threshold must be a fraction in \\[0, 1\\]"),
    ("resampling", "stratified", "resampling must be one of systematic, multinomial"),
])
def test_bad_search_options_are_named(option, value, message):
    options = {"selection": "smc", "particles": 2, option: value}
    with pytest.raises(DRMError, match=message):
        run(k=2, **options)


def test_argmax_with_several_particles_is_refused_by_name():
    with pytest.raises(DRMError, match="particles must be 1 with selection 'argmax'"):
        run(k=2, particles=3)
    assert SearchOptions("beam", 2, 3).width == 6


def test_smc_loop_neither_copies_between_host_and_device_nor_waits_for_the_device(monkeypatch):
    import drm_core.stepwise as stepwise

    from test_stepwise import _DeviceTraffic

    monkeypatch.setattr(stepwise, "_to_host", lambda trace: trace)
    x = torch.empty(2, 16, 4, 4, device="meta")
    with _DeviceTraffic() as traffic:
        res = stepwise_sample(lambda z, sigma: z * 0.5, lambda c, sigma: c.mean((1, 2, 3)), x, flow_sigmas(6), k=2,
                              selection="smc", particles=3, ess_threshold=0.5, temperature=0.5)
    assert res.latent.device.type == "meta" and traffic.events == []


def test_toy_search_counts_calls_and_matches_the_budget():
    """The measurement's cost model: calls counted on stubs, each method's knob matched to the budget."""
    from training.toy.search import CostModel, Method, call_rows, default_method, match, pool, predicted_ratio

    cost = CostModel(generator=((64, 1.0),), drm=((64, 0.1),))  # seconds per row, flat
    default = default_method(20)
    gen, drm = call_rows(default, 20, 640)
    assert gen == [128] * 20 * 5 and drm == [4 * 128] * 10 * 5  # 5 chunks of 128 prompts, 10 branched steps
    assert predicted_ratio(default, 20, 640, cost) == pytest.approx((20 + 0.1 * 40) / 20)
    smc = Method("smc", k=2, particles=2, temperature=0.02)
    gen, drm = call_rows(replace_scale(smc, 4), 20, 640)
    assert max(gen) == 128  # 64 prompts per chunk x 2 particles: no larger generator batch than plain sampling
    assert sum(gen) == 640 * (20 + 3) and sum(drm) == 640 * 4 * 4
    assert match(Method("argmax", k=2), 1.2, 20, 640, cost).scale == 19
    assert match(Method("best-of-N", particles=2), 1.2, 20, 640, cost).scale == 12
    rows = [{"method": "m", "params": "p", "budget": "b", "drm": "d", "seed": s, "gt": g, "gt_se": 0.3,
             "delta_vs_default": 0.0, "delta_se": 0.4, "seconds": 1.0, "time_ratio": r, "predicted_ratio": 1.0}
            for s, g, r in ((0, 1.0, 1.1), (1, 2.0, 1.3))]
    (pooled,) = pool(rows)
    assert pooled["gt"] == 1.5 and pooled["gt_se"] == pytest.approx(math.sqrt(0.18) / 2)
    assert pooled["time_ratio"] == pytest.approx(1.2)


def replace_scale(method, scale):
    from dataclasses import replace

    return replace(method, scale=scale)
