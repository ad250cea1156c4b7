"""`tms report` labels and summaries from run folders written the way the pipeline writes them."""

import json

from tms_axolotl_plugin.report import load_run, write_report


def make_run(root, schedule: str | None):
    """A run folder: stages.json, harvest metrics and student metrics, as the pipeline lays
    them out. `schedule=None` is a run recorded before the schedule was stored."""
    harvest = root / "harvest"
    harvest.mkdir(parents=True)
    student = {"fingerprint": "fp1", "status": "done"}
    if schedule:
        student["schedule"] = schedule
    (root / "tms" / "student").mkdir(parents=True)
    (root / "tms" / "stages.json").write_text(json.dumps(
        {"harvest": {"output_dir": str(harvest)}, "student": student}))
    rows = [{"step": s, "tms/pld": p, "tms/pld_drift": d, "tms/retention_nll": r}
            for s, p, d, r in [(0, 1.2, 0.0, 0.60), (5, 0.9, 0.0, 0.63), (10, 1.0, 0.1, 0.70)]]
    for path in (harvest / "tms_metrics.jsonl", root / "tms" / "student" / "metrics-fp1.jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_student_label_follows_the_schedule(tmp_path):
    assert load_run(make_run(tmp_path / "a", "offline")).stages["student"].label == "TMS (student)"
    iterative = load_run(make_run(tmp_path / "b", "iterative"))
    assert iterative.stages["student"].label == "iterative SFT (student)"
    assert iterative.stages["harvest"].label == "SFT (harvest)"
    assert load_run(make_run(tmp_path / "c", None)).stages["student"].label == "TMS (student)"


def test_summary_names_each_run_stage_by_its_label(tmp_path):
    runs = [make_run(tmp_path / "tms", "offline"), make_run(tmp_path / "iter", "iterative")]
    summary = write_report(runs, tmp_path / "report")
    assert [r["labels"]["student"] for r in summary["runs"]] == \
        ["TMS (student)", "iterative SFT (student)"]
    student = summary["runs"][1]["student"]
    assert student["pld_first"] == 1.2 and student["pld_min"] == 0.9
    assert abs(student["pld_final_drift"] - 0.1) < 1e-12
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "| iter | iterative SFT (student) |" in markdown
    assert "| tms | TMS (student) |" in markdown
    for name in summary["plots"]:
        assert (tmp_path / "report" / name).stat().st_size > 0
