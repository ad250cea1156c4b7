"""What a TMS run did, in a few lines a user can act on.

The pipeline records each stage's outcome (done or skipped and why, seconds taken) in
`tms/run_summary.json` as it goes; when the student has finished, `final_summary` adds the
student's time and the last PLD/retention values of SFT (the harvest) and the student, and
writes `tms/summary.md`, which is also logged. A fallback rate above `FALLBACK_WARNING` is a
warning that names the keys to change.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.files import write_text_atomic
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)

FALLBACK_WARNING = 0.2  # drawn turns trained on the original label because the answer failed
METRICS = (("tms/pld", "PLD (held-out NLL of the labels)"),
           ("tms/retention_nll", "retention NLL of the base model's answers"),
           ("tms/retention_mc_acc", "multiple-choice retention accuracy"))


def fallback_warning(stats: dict[str, Any]) -> str | None:
    """The warning for a mixture whose drawn answers often fell back to the label, or None."""
    rate = stats.get("fallback_rate", 0.0)
    if rate <= FALLBACK_WARNING:
        return None
    truncated, empty = stats.get("fallback_truncated", 0), stats.get("fallback_empty", 0)
    cause = ("most were cut at the token cap: raise `tms.generation.max_new_tokens` (and "
             "`sequence_len` if prompts are long)" if truncated >= empty else
             "most were empty: check the chat template and the checkpoints")
    return (f"{rate:.0%} of the drawn turns were trained on their original label instead of "
            f"a checkpoint's answer ({truncated} truncated, {empty} empty), so the student saw "
            f"more labels than alpha says; {cause}")


class StageLog:
    """Rank 0's record of the stages before the student, kept in `tms/run_summary.json`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stages: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def _entry(self, stage: str) -> dict[str, Any]:
        entry = next((e for e in self.stages if e["stage"] == stage), None)
        if entry is None:
            entry = {"stage": stage, "outcome": "", "seconds": None}
            self.stages.append(entry)
        return entry

    def note(self, stage: str, message: str) -> None:
        """The stage's latest message (the one-line outcome logged for it)."""
        self._entry(stage)["outcome"] = message

    @contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        yield
        self._entry(stage)["seconds"] = round(time.perf_counter() - started, 1)

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(
            {"stages": self.stages, **self.extra, "student_started": time.time()}, indent=2))


def final_values(output_dir: Path) -> dict[str, dict[str, float]]:
    """Last recorded value of each metric, per stage ("harvest" = SFT, "student")."""
    from tms_axolotl_plugin.errors import TMSError
    from tms_axolotl_plugin.report import load_run

    try:
        run = load_run(output_dir)
    except TMSError:
        return {}
    values: dict[str, dict[str, float]] = {}
    for stage, series in run.stages.items():
        for key, _ in METRICS:
            _, points = series.series(key)
            if points:
                values.setdefault(stage, {})[key] = points[-1]
    return values


def final_summary(output_dir: Path) -> str:
    """The markdown summary of a finished run; written to `tms/summary.md`."""
    root = Path(output_dir) / "tms"
    record = json.loads((root / "run_summary.json").read_text()) \
        if (root / "run_summary.json").exists() else {"stages": []}
    lines = ["# TMS run summary", "", "| stage | outcome | seconds |", "|---|---|---|"]
    for entry in record["stages"]:
        if not entry["outcome"]:
            continue  # a stage with nothing to do (metric inputs with PLD and retention off)
        seconds = entry.get("seconds")
        if entry["stage"] == "student" and seconds is None and record.get("student_started"):
            seconds = time.time() - record["student_started"]  # training up to now
        seconds = "" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {entry['stage']} | {entry['outcome'].replace('|', '/')} | {seconds} |")
    answers = record.get("answers_per_checkpoint")
    if answers:
        lines += ["", "Answers generated per checkpoint: " + ", ".join(
            f"{t}: {n}" for t, n in sorted(answers.items(), key=lambda kv: int(kv[0])))]
    mixture = record.get("mixture")
    if mixture:
        kept = ", ".join(f"{n} {why}" for why, n in mixture["turns_kept"].items()) or "none"
        lines += ["", (f"Trained turns over all epochs: {mixture['turns']}: "
                       f"{mixture['turns_regenerated']} regenerated, "
                       f"{mixture['turns_label_drawn']} label drawn, kept: {kept}. Fallbacks to "
                       f"the original label: {mixture['fallback_truncated']} truncated, "
                       f"{mixture['fallback_empty']} empty ({mixture['fallback_rate']:.1%} of "
                       "drawn turns).")]
        warning = fallback_warning(mixture)
        if warning:
            lines += ["", f"**Warning:** {warning}."]
    values = final_values(Path(output_dir))
    if values:
        lines += ["", "| metric (last value) | SFT (harvest) | student |", "|---|---|---|"]
        for key, name in METRICS:
            if any(key in v for v in values.values()):
                sft, student = (values.get(s, {}).get(key) for s in ("harvest", "student"))
                lines.append(f"| {name} | {_number(sft)} | {_number(student)} |")
    lines += ["", f"Plots and the full comparison: `tms report {output_dir}`"]
    text = "\n".join(lines) + "\n"
    write_text_atomic(root / "summary.md", text)
    return text


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
