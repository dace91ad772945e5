"""compare.json's figures as a table (compare.md, and the job's last lines) and a plot (compare.png)."""

import json

from plad_ray.data import storage


def table(result: dict) -> str:
    """Objectives, their chosen rate, test accuracy (per seed), best-of-n (and its difference to the default's, with
    its interval), and against the default: the mean difference, its interval and the verdict under the rule."""
    level = result["aa"]["level"]
    lines = [
        "| objective | lr (dev) | test accuracy | per seed | best-of-n | vs default "
        f"| {level:.0%} interval | verdict |",
        "|---|---|---|---|---|---|---|---|",
        f"| initial student | - | {result['initial_student']['test']:.3f} | - | - | - | - | - |",
    ]
    for name, arm in result["arms"].items():
        ci = arm.get("vs_default")
        edge = " (grid edge)" if result["edge"].get(name) else ""
        setting = result.get("setting", {}).get(name, name)
        tuned = f" → {setting}" if setting != name else ""  # the candidate chosen on dev
        lines.append(
            f"| {name}{tuned}{' (default)' if name == result['default'] else ''} | {result['chosen'][name]:g}{edge} | "
            f"{arm['test']:.3f} | {', '.join(f'{s:.3f}' for s in arm['per_seed'])} | "
            + (f"{arm['best_of_n']:.3f}" if "best_of_n" in arm else "-")
            + (_difference(arm["best_of_n_vs_default"]) if "best_of_n_vs_default" in arm else "")
            + " | "
            + (f"{ci['mean']:+.3f} | [{ci['low']:+.3f}, {ci['high']:+.3f}] | {arm['verdict']}" if ci else "- | - | -")
            + " |"
        )
    aa = result["aa"]
    lines += [
        "",
        f"A/A ({result['default']} against itself, another data order): {aa['mean']:+.3f} "
        f"[{aa['low']:+.3f}, {aa['high']:+.3f}]; noise floor {result['noise_floor']:.3f}.",
        f"Test prompts {len(result['split']['test'])}, dev prompts {len(result['split']['dev'])}, "
        f"seeds {result['settings']['seeds']}; {result['minutes']:.1f} min in the call that wrote this "
        "(a resumed comparison counts only its own).",
        "",
        f"Rule: {result['rule']}",
    ]
    return "\n".join(lines)


def _difference(ci: dict) -> str:
    return f" ({ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}])"


def plot(result: dict) -> bytes:
    """Left: test accuracy with its interval against the default, per objective. Right: dev accuracy per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plad_ray.evaluation.report import png_bytes

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["arms"])
    base = result["arms"][result["default"]]["test"]
    for i, name in enumerate(names):
        arm = result["arms"][name]
        ci = arm.get("vs_default") or {"low": 0.0, "high": 0.0, "mean": 0.0}
        left.errorbar(
            [i], [arm["test"]], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]], fmt="o", capsize=4
        )
    left.axhline(base, color="gray", linestyle="--", label=f"default ({result['default']})")
    floor = result["noise_floor"]
    left.axhspan(base - floor, base + floor, color="gray", alpha=0.15, label="A/A noise floor")
    left.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("test accuracy (greedy)")
    left.axhline(result["initial_student"]["test"], color="black", linestyle=":", label="initial student")
    left.set_title(
        "objectives at their dev-chosen rate\n(bars: the interval of the difference to the default)", fontsize=9
    )
    left.legend(fontsize=7)
    for name, curve in result["dev"].items():
        rates = sorted(curve, key=float)
        right.plot([float(r) for r in rates], [curve[r] for r in rates], "o-", label=name)
    right.set_xscale("log")
    right.set_xlabel("learning rate")
    right.set_ylabel("dev accuracy (seed 0)")
    right.set_title("learning-rate grid (a tuned objective: a curve per candidate)", fontsize=9)
    right.legend(fontsize=6 if len(result["dev"]) > 6 else 7)
    return png_bytes(fig)


def write(out: str, result: dict) -> None:
    storage.write_text(storage.join(out, "compare.md"), table(result) + "\n\n![compare](compare.png)\n")
    storage.write_bytes(storage.join(out, "compare.png"), plot(result))
    storage.write_text(storage.join(out, "compare.json"), json.dumps(result, indent=1))
