"""`tms report`: pictures and a summary of SFT (harvest) vs TMS (student) from run folders.

Reads the metric files the training callback wrote (`tms_metrics.jsonl` in the harvest run,
`tms/student/metrics-<fp>.jsonl` for the student) and writes:
    pld.png                 PLD over training, SFT vs TMS
    retention.png           retention NLL over training, SFT vs TMS
    drift_vs_retention.png  PLD drift against retention loss, with Pearson and Spearman r
    summary.json, summary.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tms_axolotl_plugin.errors import TMSError

# The student of `tms.schedule: iterative` is the iterative-SFT baseline, not TMS.
STUDENT_LABELS = {"offline": "TMS (student)", "iterative": "iterative SFT (student)"}


@dataclass
class StageSeries:
    stage: str
    rows: list[dict] = field(default_factory=list)
    label: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def retention_loss(self) -> list[tuple[float, float]]:
        """(PLD drift, retention NLL minus its first value) at steps that have both."""
        both = [r for r in self.rows if "tms/pld_drift" in r and "tms/retention_nll" in r]
        if not both:
            return []
        start = both[0]["tms/retention_nll"]
        return [(r["tms/pld_drift"], r["tms/retention_nll"] - start) for r in both]


@dataclass
class RunMetrics:
    name: str
    stages: dict[str, StageSeries]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(output_dir: Path) -> RunMetrics:
    output_dir = Path(output_dir)
    stages_file = output_dir / "tms" / "stages.json"
    if not stages_file.exists():
        raise TMSError(f"{output_dir} is not a TMS run folder (no tms/stages.json)")
    stages = json.loads(stages_file.read_text())
    series = {}
    harvest = stages.get("harvest", {}).get("output_dir")
    if harvest:
        series["harvest"] = StageSeries("harvest", _read_jsonl(Path(harvest) / "tms_metrics.jsonl"),
                                        "SFT (harvest)")
    student = stages.get("student", {})
    if student.get("fingerprint"):
        path = output_dir / "tms" / "student" / f"metrics-{student['fingerprint']}.jsonl"
        # Runs recorded before the schedule was stored are offline TMS runs.
        label = STUDENT_LABELS.get(student.get("schedule", "offline"), "student")
        series["student"] = StageSeries("student", _read_jsonl(path), label)
    if not any(s.rows for s in series.values()):
        raise TMSError(f"{output_dir}: no PLD/retention metrics were recorded (tms.pld and "
                       "tms.retention disabled?)")
    return RunMetrics(output_dir.name, series)


def correlation(points: list[tuple[float, float]]) -> dict[str, float | int | None]:
    from scipy import stats

    result: dict[str, float | int | None] = {"points": len(points), "pearson": None,
                                             "spearman": None}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
        result["pearson"] = float(stats.pearsonr(xs, ys).statistic)
        result["spearman"] = float(stats.spearmanr(xs, ys).statistic)
    return result


def _plot_metric(runs: list[RunMetrics], key: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        for stage, data in run.stages.items():
            steps, values = data.series(key)
            if steps:
                style = "-" if stage == "harvest" else "--"
                label = data.label + (f" [{run.name}]" if len(runs) > 1 else "")
                ax.plot(steps, values, style, marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: list[Path], out_dir: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_metric(runs, "tms/pld", "PLD: held-out NLL of the labels (nats/token)",
                 out_dir / "pld.png")
    _plot_metric(runs, "tms/retention_nll", "retention NLL of base answers (nats/token)",
                 out_dir / "retention.png")
    plots = ["pld.png", "retention.png", "drift_vs_retention.png"]
    if any(data.series("tms/retention_mc_acc")[0] for run in runs for data in run.stages.values()):
        _plot_metric(runs, "tms/retention_mc_acc", "multiple-choice retention accuracy",
                     out_dir / "retention_mc_acc.png")
        plots.append("retention_mc_acc.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    all_points: list[tuple[float, float]] = []
    for run in runs:
        for stage, data in run.stages.items():
            points = data.retention_loss()
            all_points += points
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=14,
                           label=data.label + (f" [{run.name}]" if len(runs) > 1 else ""))
    overall = correlation(all_points)
    title = "PLD drift vs retention loss"
    if overall["pearson"] is not None:
        title += f"\nPearson r={overall['pearson']:.2f}, Spearman ρ={overall['spearman']:.2f}"
    ax.set_title(title)
    ax.set_xlabel("PLD drift (nats/token)")
    ax.set_ylabel("retention loss: Δ retention NLL since start")
    ax.grid(alpha=0.3)
    if all_points:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "drift_vs_retention.png", dpi=120)
    plt.close(fig)

    summary = {"runs": [], "drift_vs_retention": overall, "plots": plots}
    for run in runs:
        entry = {"run": run.name, "labels": {s: d.label for s, d in run.stages.items()}}
        for stage, data in run.stages.items():
            _, pld = data.series("tms/pld")
            _, retention = data.series("tms/retention_nll")
            _, accuracy = data.series("tms/retention_mc_acc")
            entry[stage] = {
                "points": len(data.rows),
                "pld_first": pld[0] if pld else None, "pld_last": pld[-1] if pld else None,
                "pld_min": min(pld) if pld else None,
                "pld_final_drift": (pld[-1] - min(pld)) if pld else None,
                "retention_nll_first": retention[0] if retention else None,
                "retention_nll_last": retention[-1] if retention else None,
                "retention_mc_acc_first": accuracy[0] if accuracy else None,
                "retention_mc_acc_last": accuracy[-1] if accuracy else None,
                "drift_vs_retention": correlation(data.retention_loss()),
            }
        summary["runs"].append(entry)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(_markdown(summary))
    return summary


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(summary: dict) -> str:
    lines = ["# TMS report", "",
             "| run | stage | PLD first | PLD last | PLD final drift | retention NLL first | "
             "retention NLL last | MC accuracy first | MC accuracy last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        for stage in ("harvest", "student"):
            if stage in run:
                s = run[stage]
                lines.append(f"| {run['run']} | {run['labels'][stage]} | {_fmt(s['pld_first'])} | "
                             f"{_fmt(s['pld_last'])} | {_fmt(s['pld_final_drift'])} | "
                             f"{_fmt(s['retention_nll_first'])} | {_fmt(s['retention_nll_last'])} | "
                             f"{_fmt(s['retention_mc_acc_first'])} | "
                             f"{_fmt(s['retention_mc_acc_last'])} |")
    c = summary["drift_vs_retention"]
    lines += ["", f"PLD drift vs retention loss over {c['points']} points: Pearson r = "
              f"{_fmt(c['pearson'])}, Spearman rho = {_fmt(c['spearman'])}.", "",
              "Plots: " + ", ".join(summary["plots"]), ""]
    return "\n".join(lines)
