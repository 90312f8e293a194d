"""``safetygame eval report``: a Markdown table and PNG plots from saved EvalLogs.

Reads every ``<results>/<benchmark>/evallog.json`` whose status is ``success`` and writes,
into ``<results>``:

- ``report.md``: multiple-choice accuracy (method x benchmark, expected accuracy with its 95%
  bootstrap interval), the tuned budgets, and the open-ended refusal table;
- ``accuracy_vs_T.png``: per benchmark, test accuracy (multiple choice) or behaviour score
  (open-ended) of the budgeted methods against T, the dev-tuned T marked;
- ``frontier.png``: per benchmark, the (expected extra risk, expected helpfulness) points
  the Safety Game, its pooled-budget variant (mean risk <= T: the best trade-off of mean
  risk and helpfulness these candidates allow) and the risk filter reach as T varies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetygame.errors import ConfigError
from safetygame.eval.harness import LOG_NAME, EvalLog, read_eval_log

__all__ = ["collect", "markdown", "plot_accuracy_vs_budget", "plot_frontier", "write_report"]

_STYLE = {
    "safety-game": ("tab:blue", "o"),
    "safety-game-baseline": ("tab:green", "s"),
    "filter": ("tab:red", "^"),
    "safety-game-pooled": ("tab:purple", "D"),
}


def collect(results_dir: str | Path) -> list[EvalLog]:
    """Successful logs under ``results_dir`` (one folder per benchmark), sorted by benchmark."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ConfigError(f"results folder {root} does not exist")
    logs = [read_eval_log(p) for p in sorted(root.glob(f"*/{LOG_NAME}"))]
    logs = [g for g in logs if g.status == "success"]
    if not logs:
        raise ConfigError(f"no successful eval logs ({LOG_NAME}) under {root}")
    return sorted(logs, key=lambda g: g.benchmark)


def _cell(m: dict[str, Any] | None, key: str, ci_key: str) -> str:
    if m is None or m.get(key) is None:
        return "-"
    ci = m.get(ci_key)
    ci_s = "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{m[key]:.3f}{ci_s}"


def markdown(logs: list[EvalLog]) -> str:
    mc = [g for g in logs if g.kind == "mc"]
    op = [g for g in logs if g.kind == "open"]
    out = ["# Evaluation report", ""]
    if mc:
        methods: list[str] = []
        for g in mc:
            methods += [k for k in g.results["methods"] if k not in methods]
        out += [
            "## Multiple choice: expected accuracy (mass on the correct option), test split, "
            "95% bootstrap interval",
            "",
            "| method | " + " | ".join(f"{g.benchmark} (n={g.results['n']})" for g in mc) + " |",
            "|---|" + "---|" * len(mc),
        ]
        for name in methods:
            cells = [_cell(g.results["methods"].get(name), "acc", "ci") for g in mc]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Argmax accuracy:",
            "",
            "| method | " + " | ".join(g.benchmark for g in mc) + " |",
            "|---|" + "---|" * len(mc),
        ]
        for name in methods:
            cells = [_cell(g.results["methods"].get(name), "argmax_acc", "argmax_ci") for g in mc]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Tuned on the dev split (T, beta; dev accuracy; the tuning rule's decision, "
            "docs/evaluation.md) and paired bootstrap of the Safety Game (fallback b) against G:",
            "",
        ]
        for g in mc:
            tuned = ", ".join(
                f"{k}: T={v['budget']:g}, beta={v['beta']}, dev {v['dev_acc']:.3f}{_rule(v)}"
                for k, v in g.results["tuned"].items()
            )
            pair = g.results["paired"].get("safety-game-baseline", {}).get("G")
            ptxt = (
                ""
                if pair is None
                else (
                    f"; vs G: {pair['diff']:+.3f} [{pair['ci'][0]:+.3f}, {pair['ci'][1]:+.3f}], "
                    f"p={pair['p_value']:.3f}"
                )
            )
            out.append(f"- {g.benchmark} ({g.results['model_id']}): {tuned}{ptxt}")
        out.append("")
    if op:
        out += [
            "## Open-ended: refusal rate on harmful/unsafe prompts and over-refusal on safe "
            "prompts, test split, 95% bootstrap interval",
            "",
            "| benchmark | system | T | refusal (harmful) | over-refusal (safe) |",
            "|---|---|---|---|---|",
        ]
        for g in op:
            for name, m in g.results["methods"].items():
                T = "-" if m.get("budget") is None else f"{m['budget']:g}"
                out.append(
                    f"| {g.benchmark} (n={g.results['n']}) | {name} | {T} | "
                    f"{_cell(m, 'refusal_rate', 'refusal_rate_ci')} | "
                    f"{_cell(m, 'over_refusal', 'over_refusal_ci')} |"
                )
        out += [
            "",
            "Refusal detector (mode; agreement of patterns and probe on all "
            "candidate texts; accuracy on the known replies):",
            "",
        ]
        for g in op:
            det = g.results["detector"]
            ag, va = det["agreement"], det["validation"]
            out.append(
                f"- {g.benchmark}: mode {det['mode']}; agreement "
                f"{_num(ag['agreement'])} (kappa {_num(ag['kappa'])}, n={ag['n']}); known "
                f"replies: patterns {_num(va['pattern_acc'])}, probe {_num(va['probe_acc'])}, "
                f"combined {_num(va['combined_acc'])} (n={va['n']})"
            )
        out.append("")
    return "\n".join(out)


def _rule(tuned: dict[str, Any]) -> str:
    """What the tuning rule did (logs written before the rule say nothing)."""
    if "adopted" not in tuned:
        return ""
    return " (dev-best, adopted)" if tuned["adopted"] else " (policy's, kept)"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return (n + cols - 1) // cols, cols


def _headline(log: EvalLog) -> str:
    """The results key the plot shows: accuracy for multiple choice, the behaviour score else."""
    return "acc" if log.kind == "mc" else "score"


def reported_points(log: EvalLog) -> list[tuple[str, float, float]]:
    """(method, dev-tuned T, reported test value) of each budgeted method in ``log``.

    The curves use the hard cap, but the reported point may be soft (a tuned beta) and so sit
    off its curve; the plot draws it rather than leave the reader to guess.
    """
    key = _headline(log)
    return [
        (name, float(tuned["budget"]), float(log.results["methods"][name][key]))
        for name, tuned in log.results["tuned"].items()
        if name in _STYLE and name in log.results["methods"]
    ]


def plot_accuracy_vs_budget(logs: list[EvalLog], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(logs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, g in zip(axes.flat, logs, strict=False):
        T = g.curves["budgets"]
        key = _headline(g)
        for name, (color, marker) in _STYLE.items():
            if name not in g.curves:
                continue
            ax.plot(T, g.curves[name][key], color=color, marker=marker, ms=4, label=name)
        for name, budget, value in reported_points(g):
            color = _STYLE[name][0]
            ax.axvline(budget, color=color, ls=":", lw=1)
            ax.plot(budget, value, color=color, marker="*", ms=11, mec="black", mew=0.5, ls="none")
        if g.kind == "mc" and "G" in g.results["methods"]:
            ax.axhline(g.results["methods"]["G"]["acc"], color="grey", ls="--", lw=1, label="G")
        if g.kind == "open":
            plain = g.results["methods"]["plain"]["score"]
            ax.axhline(plain, color="grey", ls="--", lw=1, label="plain")
        ax.set_xscale("symlog", linthresh=0.01)
        # A little room left of 0, so a tuned T of 0 stays visible.
        ax.set_xlim(-0.001, max(T) * 1.05)
        ax.set_xlabel("budget T, hard cap (dotted, star: dev-tuned, reported)", fontsize=8)
        ax.set_ylabel("expected accuracy" if g.kind == "mc" else "behaviour score")
        ax.set_title(f"{g.benchmark} (test n={g.results['n']})", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(logs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(logs: list[EvalLog], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(logs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, g in zip(axes.flat, logs, strict=False):
        for name in ("safety-game", "safety-game-pooled", "filter"):
            if name not in g.curves:
                continue
            color, marker = _STYLE[name]
            c = g.curves[name]
            ax.plot(
                c["extra_risk"],
                c["helpfulness"],
                color=color,
                marker=marker,
                ms=4,
                label=name,
                drawstyle="default",
            )
        ax.set_xlabel("expected extra risk (harm over refusing)")
        ax.set_ylabel("expected helpfulness")
        ax.set_title(
            f"{g.benchmark}: T from {min(g.curves['budgets']):g} to {max(g.curves['budgets']):g}",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(logs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and the two PNGs into ``results_dir``; returns paths and text."""
    root = Path(results_dir)
    logs = collect(root)
    text = markdown(logs)
    md = root / "report.md"
    md.write_text(text, encoding="utf-8")
    acc = plot_accuracy_vs_budget(logs, root / "accuracy_vs_T.png")
    fr = plot_frontier(logs, root / "frontier.png")
    return {
        "benchmarks": [g.benchmark for g in logs],
        "files": [str(md), str(acc), str(fr)],
        "markdown": str(md),
        "markdown_text": text,
    }
