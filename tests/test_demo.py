import json

from training.cli import main


def test_quick_demo_writes_report_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("drm_accuracy", "drm_accuracy_random_init", "stepwise", "best_of_n", "seed", "n_prompts",
                "n_samples"):
        assert key in metrics, key
    assert set(metrics["drm_accuracy"]) == {"0.0", "0.25", "0.5", "0.75"}
    assert set(metrics["stepwise"]) == {"1", "2", "4"}
    for v in metrics["stepwise"].values():
        assert {"gt_reward_mean", "gt_reward_sem", "seconds"} <= set(v)
    assert metrics["best_of_n"] and all("matched_k" in v for v in metrics["best_of_n"].values())
    options = metrics["guidance_options"]
    assert "plain SDE" in options and "plain ODE" in options and any(n.startswith("default") for n in options)
    for v in options.values():
        assert {"time_ratio", "flop_ratio", "gain_vs_sde", "gain_vs_ode", "gt_reward_mean"} <= set(v)
    assert options["plain SDE"]["flop_ratio"] == 1.0 and options["plain SDE"]["time_ratio"] == 1.0
    assert all(v["flop_ratio"] > 1.0 for n, v in options.items() if not n.startswith("plain"))
    assert metrics["cfg_scale"] == 4.5
    for key in ("grpo", "step_grpo"):  # curve rows: [iteration, seconds, gt, drm, prompt alignment, gt se]
        assert len(metrics[key]["curve"][0]) == 6 and "guard_pick_gt" in metrics[key]
    assert set(metrics["step_grpo_k"]) == {"2", "4"}
    assert all("guard_pick_gt" in v for v in metrics["step_grpo_k"].values())
    assert set(metrics["summary"]["step_grpo_k_drop_from_peak_se"]) == {"2", "4"}
    assert set(metrics["guard_check"]) == {"every_step_trained", "lr_0.003"}
    assert "step_grpo_drop_from_peak_se" in metrics["summary"]
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| claim | reproduced | evidence |" in report
    assert (out / "accuracy_and_reward.png").stat().st_size > 1000
    assert list(out.glob("samples_*.png"))
    assert str(out.resolve() / "report.md") in capsys.readouterr().out

    # the search CLI on the demo's models, with a value DRM trained by train-drm on the generator's rollouts
    from training.toy.search import main as search_main

    assert search_main(["--work", str(out / "work"), "--out", str(tmp_path / "search"), "--set", "search.value_steps=2",
                        "--set", "search.value_batch=4", "--set", "search.value_rollout_steps=3", "--set",
                        'search.budgets=["default"]', "--set", "search.samples_per_prompt=1", "--set",
                        "search.agreement_samples=1"]) == 0
    result = json.loads((tmp_path / "search" / "search.json").read_text())
    assert {r["drm"] for r in result["agreement"]} == {"shallow", "shallow+value"}
    value_rows = result["by_drm"]["shallow+value"]["rows"]
    assert all("delta_vs_reference" in r for r in value_rows) and not any(r["budget"].startswith("large")
                                                                           for r in value_rows)
    assert result["value_training"]["seconds"] > 0 and (out / "work" / "drm_shallow_value" / "drm.safetensors").exists()
    assert "### DRM: shallow+value" in (tmp_path / "search" / "search.md").read_text()


def test_demo_without_the_plain_baseline_is_refused_by_name(tmp_path, caplog):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--set", "sampling.ks=[2, 4]"]) != 0
    assert "sampling.ks must hold 1" in caplog.text and not (tmp_path / "demo").exists()
