"""report.md, plots and sample grids of the toy-world demo; claims are checked against the numbers."""

from __future__ import annotations

import math
from pathlib import Path

from .sampling import Batch
from .search import table as search_table
from .world import as_numpy_grid, decode_model_space


def default_option(m: dict) -> tuple[str, dict] | None:
    """The default guidance configuration's row of the cheaper-guidance table, if it was measured."""
    rows = [(n, v) for n, v in m.get("guidance_options", {}).items() if n.startswith("default")]
    return rows[0] if rows else None


def claims(m: dict) -> list[tuple[str, bool, str]]:
    """(claim, reproduced?, evidence) for the paper's result shapes."""
    acc = m["drm_accuracy"]
    accs = [acc[s] for s in sorted(acc, key=float)]
    sw = m["stepwise"]
    ks = sorted(sw, key=int)
    means = [sw[k]["gt_reward_mean"] for k in ks]
    out = [("DRM accuracy at sigma = 0 is at least 0.85 (Table 2)", accs[0] >= 0.85, f"{accs[0]:.3f}"),
           ("accuracy does not increase with sigma (Table 2)",
            all(b <= a + 0.01 for a, b in zip(accs, accs[1:])), " > ".join(f"{a:.3f}" for a in accs)),
           ("ground-truth reward rises monotonically in k (Table 4)",
            all(b > a for a, b in zip(means, means[1:])), " < ".join(f"{v:.3f}" for v in means))]
    if "1" in sw and "4" in sw:
        gap = sw["4"]["gt_reward_mean"] - sw["1"]["gt_reward_mean"]
        se = math.hypot(sw["4"]["gt_reward_sem"], sw["1"]["gt_reward_sem"])
        out.append(("k = 4 beats plain sampling by at least 3 standard errors", gap >= 3 * se,
                    f"gap {gap:.3f}, standard error of the gap {se:.3f} ({gap / se:.1f} SE)"))
    picked = default_option(m)
    if picked is not None:
        name, v = picked
        out.append(("the default guidance keeps >= 80% of the k = 6 gain at <= 1.6x the time of plain sampling",
                    v["gain_vs_sde"] >= 0.8 and v["time_ratio"] <= 1.6,
                    f"{name}: {v['gain_vs_sde']:.0%} of the gain over plain SDE ({v['gain_vs_ode']:.0%} over plain "
                    f"ODE) at {v['time_ratio']:.2f}x measured (FLOP model {v['flop_ratio']:.2f}x)"))
        bon = m["best_of_n"]
        if bon:
            n, b = next(((n, b) for n, b in bon.items() if b["matched_k"] == "default"),
                        min(bon.items(), key=lambda kv: abs(kv[1]["seconds"] - v["seconds"])))
            out.append(("the default beats best-of-N at about equal or more wall time",
                        v["gt_reward_mean"] > b["gt_reward_mean"],
                        f"{v['gt_reward_mean']:.3f} at {v['time_ratio']:.2f}x vs best-of-{n} "
                        f"{b['gt_reward_mean']:.3f} at {b['seconds'] / m['stepwise']['1']['seconds']:.2f}x"))
    if "summary" in m:
        g = m["summary"]
        it, sec = g["step_grpo_reaches_it_at_iteration"], g["step_grpo_reaches_it_at_seconds"]
        reached = it is not None
        out.append(("Step-GRPO reaches GRPO's best ground-truth reward in at most half the steps and time (Fig. 2, 7)",
                    reached and it <= g["grpo_best_at_iteration"] / 2 and sec <= g["grpo_best_at_seconds"] / 2,
                    (f"GRPO best {g['grpo_best_gt']:.3f} at iteration {g['grpo_best_at_iteration']:.0f} "
                     f"({g['grpo_best_at_seconds']:.0f} s); Step-GRPO " +
                     (f"reaches it at iteration {it:.0f} ({sec:.0f} s)" if reached else "never reaches it"))))
        out.append(("the guard's pick (best DRM score among evaluations that keep the base model's prompt alignment) "
                    "is at least as good as GRPO's best, by ground truth", g["step_grpo_guard_pick_gt"] >= g["grpo_best_gt"],
                    f"Step-GRPO guard's pick {g['step_grpo_guard_pick_gt']:.3f} vs GRPO best {g['grpo_best_gt']:.3f} "
                    f"(untuned {g['untuned_gt']:.3f}; Step-GRPO last iteration {g['step_grpo_final_gt']:.3f})"))
        drops = g.get("step_grpo_k_drop_from_peak_se") or {"": g["step_grpo_drop_from_peak_se"]}
        out.append(("no Step-GRPO collapse: every mean curve (each k) ends within 2 standard errors of its peak",
                    max(drops.values()) <= 2.0,
                    "last point below the peak: " + ", ".join(f"{'k = ' + k + ': ' if k else ''}{v:.1f} SE"
                                                              for k, v in sorted(drops.items(), key=lambda kv: kv[0]))))
        for name, c in m.get("guard_check", {}).items():
            fired = c["alarm_iteration"] is not None
            out.append((f"the guard's alarm fires on a run that hacks ({name.replace('_', ' ')}) and its pick is near "
                        "the run's true best", fired and c["guard_pick"]["gt"] >= c["best"]["gt"] - 0.1,
                        f"alarm at iteration {c['alarm_iteration']}; pick GT {c['guard_pick']['gt']:.3f} "
                        f"(iteration {c['guard_pick']['iteration']}) vs best {c['best']['gt']:.3f} (iteration "
                        f"{c['best']['iteration']}); last {c['last_gt']:.3f}"))
    rnd = m["drm_accuracy_random_init"]
    out.append(("pretrained init beats random init at equal budget (Table 1; reported, not required)",
                acc["0.0"] > rnd["0.0"], f"sigma 0: {acc['0.0']:.3f} vs {rnd['0.0']:.3f}"))
    return out


def write_report(out: Path, m: dict, batches: dict[str, Batch]) -> None:
    plots = _plots(out, m, batches)
    acc, rnd = m["drm_accuracy"], m["drm_accuracy_random_init"]
    sig = sorted(acc, key=float)
    lines = ["# DRM toy world report", "",
             f"Seed {m['seed']}, {m['n_prompts']} prompts, {m['n_samples']} samples per sampler; "
             f"simulated annotators agree with the ground-truth ordering on "
             f"{m['label_agreement_with_ground_truth']:.1%} of training pairs.", "",
             "## Claims", "", "| claim | reproduced | evidence |", "|---|---|---|"]
    lines += [f"| {c} | {'yes' if ok else '**no**'} | {e} |" for c, ok, e in claims(m)]
    lines += ["", "## DRM pairwise accuracy vs. ground truth, per noise level", "",
              "| init | " + " | ".join(f"sigma {s}" for s in sig) + " |", "|---|" + "---|" * len(sig),
              "| pretrained (generator blocks) | " + " | ".join(f"{acc[s]:.3f}" for s in sig) + " |",
              "| random | " + " | ".join(f"{rnd[s]:.3f}" for s in sig) + " |", "",
              "## Step-wise sampling vs. best-of-N (ground-truth reward, mean +- standard error)", "",
              "| sampler | reward | seconds |", "|---|---|---|"]
    for k, v in sorted(m["stepwise"].items(), key=lambda kv: int(kv[0])):
        name = "plain SDE (k = 1)" if k == "1" else f"step-wise k = {k}"
        lines.append(f"| {name} | {v['gt_reward_mean']:.3f} +- {v['gt_reward_sem']:.3f} | {v['seconds']:.1f} |")
    for n, v in sorted(m["best_of_n"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| best-of-{n} ODE samples (DRM at sigma 0; time of {v['matched_k']}) | "
                     f"{v['gt_reward_mean']:.3f} +- {v['gt_reward_sem']:.3f} | {v['seconds']:.1f} |")
    if m.get("guidance_options"):
        lines += ["", f"## Cheaper guidance (CFG {m.get('cfg_scale', 1.0)}; time is the median ratio to plain SDE "
                      "sampling over interleaved rounds)", "",
                  "| setting | reward | gain vs. plain SDE | gain vs. plain ODE | time vs. plain | FLOP model |",
                  "|---|---|---|---|---|---|"]
        for name, v in m["guidance_options"].items():
            lines.append(f"| {name} | {v['gt_reward_mean']:.3f} +- {v['gt_reward_sem']:.3f} | {v['gain_vs_sde']:.0%} | "
                         f"{v['gain_vs_ode']:.0%} | {v['time_ratio']:.2f}x | {v['flop_ratio']:.2f}x |")
        lines += ["", "Gains are fractions of the full-range k = 6 gain over the plain sampler named."]
    if m.get("search"):
        sr = m["search"]
        lines += ["", "## Search beyond greedy argmax at equal time (docs/search.md)", "",
                  f"{sr['n_samples']} samples per method and seed, {sr['drm_dtype']} DRM; each method's budget knob "
                  "(branched steps, or sampling steps) is matched by a cost model ('model'), then its CPU time "
                  "('time'; wall time next to it) is measured against the plain SDE runs just before and after it. "
                  "'vs. default' is the paired difference in ground truth to the nodes' default on the same start "
                  "noise.", "", *search_table(sr)]
    lines += ["", "Step-wise sampling and best-of-N spend the same kind of extra compute (DRM calls and, for "
              "best-of-N, whole extra generations); N is the measured time ratio of k (or of the default) rounded, "
              "at least 2. Best-of-N draws ODE samples, the stronger plain sampler here.", ""]
    if "summary" in m:
        cfg = m["config"]["grpo"]
        lines += ["## GRPO vs. Step-GRPO", "",
                  f"{len(cfg['seeds'])} seeds, {cfg['iterations']} iterations of {cfg['prompts_per_iteration']} prompts, "
                  f"group / k = {cfg['group']}, {cfg['steps']} sampling steps, LoRA r {cfg['lora_rank']}, "
                  f"KL beta {cfg['kl_beta']}, lr {cfg['lr']}; Step-GRPO trains the steps from sigma "
                  f"{cfg['train_sigma_max']} down. Evaluated on {cfg['eval_samples']} held-out samples with "
                  f"{cfg['eval_steps']} steps, without CFG (it would double the cost of every rollout). The guard "
                  "measures each evaluation's prompt alignment with the frozen base model as a diffusion classifier "
                  "(training/alignment.py), raises the alarm when it falls more than "
                  f"{cfg['guard_tolerance']:g} of the base's below it, and picks the evaluation with the best DRM score "
                  "before the alarm (train-grpo's best_lora.safetensors). Ground truth and DRM score side by side show "
                  "reward hacking.", "",
                  "| method | seeds | untuned GT | best GT (iteration) | last GT | GT of the guard's pick | alarms | "
                  "last DRM score | train seconds |", "|---|---|---|---|---|---|---|---|---|"]
        rows = [("GRPO (terminal DRM reward)", m["grpo"]["curve"], len(cfg["seeds"]), m["grpo"]["guard_pick_gt"],
                 m["grpo"]["alarms"])]
        for k, v in sorted(m.get("step_grpo_k", {}).items(), key=lambda kv: int(kv[0])):
            rows.append((f"Step-GRPO, k = {k}", v["curve"], len(v["seeds"]), v["guard_pick_gt"], v["alarms"]))
        for name, c, seeds, pick, alarms in rows:
            best = max(c, key=lambda r: r[2])
            lines.append(f"| {name} | {seeds} | {c[0][2]:.3f} | {best[2]:.3f} +- {best[5]:.3f} ({best[0]:.0f}) | "
                         f"{c[-1][2]:.3f} +- {c[-1][5]:.3f} | {pick:.3f} | {sum(a is not None for a in alarms)} of "
                         f"{len(alarms)} | {c[-1][3]:.3f} | {c[-1][1]:.0f} |")
        for name, c in m.get("guard_check", {}).items():
            lines.append(f"| guard check: Step-GRPO, {name.replace('_', ' ')} | 1 | {c['curve'][0][2]:.3f} | "
                         f"{c['best']['gt']:.3f} ({c['best']['iteration']}) | {c['last_gt']:.3f} | "
                         f"{c['guard_pick']['gt']:.3f} | alarm at {c['alarm_iteration']} | {c['curve'][-1][3]:.3f} | "
                         f"{c['curve'][-1][1]:.0f} |")
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    t = m["timings_seconds"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _plots(out: Path, m: dict, batches: dict[str, Batch]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, key in (("pretrained init", "drm_accuracy"), ("random init", "drm_accuracy_random_init")):
        xs = sorted(m[key], key=float)
        ax[0].plot([float(x) for x in xs], [m[key][x] for x in xs], marker="o", label=name)
    ax[0].set(xlabel="sigma (noise added to both images)", ylabel="pairwise accuracy vs. ground truth",
              title="DRM accuracy per noise level", ylim=(0.45, 1.0))
    ax[0].axhline(0.5, color="grey", lw=0.5)
    ax[0].legend()
    sw = sorted(m["stepwise"].items(), key=lambda kv: int(kv[0]))
    base = m["stepwise"]["1"]["seconds"]
    ax[1].errorbar([v["seconds"] / base for _, v in sw], [v["gt_reward_mean"] for _, v in sw],
                   yerr=[v["gt_reward_sem"] for _, v in sw], marker="o", capsize=3, label="step-wise, full range (k)")
    for k, v in sw:
        ax[1].annotate(f"k={k}", (v["seconds"] / base, v["gt_reward_mean"]), textcoords="offset points",
                       xytext=(4, -10))
    bo = sorted(m["best_of_n"].items(), key=lambda kv: int(kv[0]))
    if bo:
        ax[1].errorbar([v["seconds"] / base for _, v in bo], [v["gt_reward_mean"] for _, v in bo],
                       yerr=[v["gt_reward_sem"] for _, v in bo], marker="s", capsize=3, label="best-of-N (ODE)")
        for n, v in bo:
            ax[1].annotate(f"N={n}", (v["seconds"] / base, v["gt_reward_mean"]), textcoords="offset points",
                           xytext=(4, 4))
    ax[1].set(xlabel="time / plain SDE sampling", ylabel="ground-truth reward", title="Reward vs. compute")
    ax[1].legend()
    fig.tight_layout()
    paths.append(out / "accuracy_and_reward.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if m.get("guidance_options"):
        paths.append(_guidance_plot(plt, out, m))

    if "summary" in m:
        fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
        curves = [("GRPO", m["grpo"]["curve"])]
        curves += [(f"Step-GRPO k={k}", v["curve"]) for k, v in sorted(m.get("step_grpo_k", {}).items(),
                                                                        key=lambda kv: int(kv[0]))]
        curves += [(f"hacking: {n.replace('_', ' ')}", [[*r, 0.0] for r in c["curve"]])
                   for n, c in m.get("guard_check", {}).items()]
        for name, c in curves:
            it, sec, gt, score, aligned, se = ([r[i] for r in c] for i in range(6))
            style = dict(marker="o", capsize=2, label=name, linestyle="--" if name.startswith("hacking") else "-")
            ax[0].errorbar(it, gt, yerr=se, **style)
            ax[1].errorbar(sec, gt, yerr=se, **style)
            ax[2].plot(it, score, marker="o", linestyle=style["linestyle"], label=name)
            ax[3].plot(it, aligned, marker="o", linestyle=style["linestyle"], label=name)
        ax[0].set(xlabel="optimisation step", ylabel="ground-truth reward (held out)", title="GT reward vs. steps")
        ax[1].set(xlabel="training wall time (s)", ylabel="ground-truth reward", title="GT reward vs. time")
        ax[2].set(xlabel="optimisation step", ylabel="DRM score (sigma 0)", title="DRM score (what is optimised)")
        ax[3].set(xlabel="optimisation step", ylabel="prompt alignment (base model)", title="the guard's monitor")
        for a in ax:
            a.legend()
        fig.tight_layout()
        paths.append(out / "grpo_vs_step_grpo.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    rows = []
    for name, batch in batches.items():
        per_prompt = len(batch.prompts) // 10
        pick = [c * per_prompt + j for j in range(min(3, per_prompt)) for c in range(10)]
        rows.append((name, as_numpy_grid(decode_model_space(batch.latents[pick]), rows=1 if per_prompt < 3 else 3)))
    for name, grid in rows:
        path = out / f"samples_{name.replace('=', '').replace(' ', '_')}.png"
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
        paths.append(path)
    return paths


def _guidance_plot(plt, out: Path, m: dict) -> Path:
    """Ground-truth reward vs. time of every cheaper-guidance option, numbered, with the full-range k sweep and
    best-of-N as reference lines."""
    fig, ax = plt.subplots(figsize=(10, 5))
    base = m["stepwise"]["1"]["seconds"]
    sw = sorted(m["stepwise"].items(), key=lambda kv: int(kv[0]))
    ax.plot([v["seconds"] / base for _, v in sw], [v["gt_reward_mean"] for _, v in sw], "o-", color="tab:blue",
            label="step-wise, full range, k = " + ", ".join(k for k, _ in sw))
    bo = sorted(m["best_of_n"].items(), key=lambda kv: int(kv[0]))
    if bo:
        ax.plot([v["seconds"] / base for _, v in bo], [v["gt_reward_mean"] for _, v in bo], "s-", color="tab:orange",
                label="best-of-N (ODE), N = " + ", ".join(n for n, _ in bo))
    for i, (name, v) in enumerate(m["guidance_options"].items(), 1):
        default = name.startswith("default")
        color = "tab:red" if default else "tab:green"
        ax.errorbar([v["time_ratio"]], [v["gt_reward_mean"]], yerr=[v["gt_reward_sem"]], capsize=2, color=color,
                    marker="*" if default else "^", markersize=12 if default else 6, linestyle="none",
                    label=f"{i}: {name} ({v['time_ratio']:.2f}x, FLOP model {v['flop_ratio']:.2f}x)")
        ax.annotate(str(i), (v["time_ratio"], v["gt_reward_mean"]), textcoords="offset points", xytext=(5, 3),
                    color=color)
    ax.axvline(1.6, color="grey", lw=0.5, ls="--")
    ax.set(xlabel="time / plain SDE sampling (median over rounds)", ylabel="ground-truth reward",
           title=f"Cheaper guidance at CFG {m.get('cfg_scale', 1.0)}: reward vs. time")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / "guidance_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
