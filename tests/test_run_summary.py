"""The run summary (run_summary.py): what each stage did and took, turns and fallbacks, the
last PLD/retention of SFT vs the student, and a warning that names the keys to change."""

from __future__ import annotations

import json

from tms_axolotl_plugin.run_summary import StageLog, fallback_warning, final_summary

MIXTURE = {"rows": 20, "turns": 30, "turns_regenerated": 10, "turns_label_drawn": 6,
           "turns_kept": {"tool call": 4}, "fallback_empty": 1, "fallback_truncated": 9,
           "fallback_rate": 0.5}


def test_fallback_warning_names_the_token_cap_when_answers_were_truncated():
    warning = fallback_warning(MIXTURE)
    assert "50%" in warning and "tms.generation.max_new_tokens" in warning
    assert "sequence_len" in warning
    assert fallback_warning({**MIXTURE, "fallback_rate": 0.1}) is None
    empty = fallback_warning({**MIXTURE, "fallback_empty": 9, "fallback_truncated": 1})
    assert "empty" in empty and "max_new_tokens" not in empty


def test_final_summary_lists_stages_turns_fallbacks_metrics_and_the_report_command(tmp_path):
    out = tmp_path / "out"
    harvest = out / "tms" / "harvest-abc"
    harvest.mkdir(parents=True)
    log = StageLog(out / "tms" / "run_summary.json")
    with log.timed("harvest"):
        log.note("harvest", "done: 2 checkpoints at steps [3, 6]")
    log.note("regenerate", "skipped: all 12 answers stored")
    log.note("student", "training on the mixture")
    log.extra.update(mixture=MIXTURE, answers_per_checkpoint={"1": 5, "2": 7})
    log.save()
    (harvest / "tms_metrics.jsonl").write_text(
        json.dumps({"step": 0, "tms/pld": 2.0}) + "\n" + json.dumps({"step": 6, "tms/pld": 1.5})
        + "\n")
    (out / "tms" / "student").mkdir()
    (out / "tms" / "student" / "metrics-fp.jsonl").write_text(
        json.dumps({"step": 6, "tms/pld": 1.75}) + "\n")
    (out / "tms" / "stages.json").write_text(json.dumps({
        "harvest": {"output_dir": str(harvest)}, "student": {"fingerprint": "fp"}}))

    text = final_summary(out)
    assert "| harvest | done: 2 checkpoints at steps [3, 6] |" in text
    assert "| regenerate | skipped: all 12 answers stored |" in text
    assert "Answers generated per checkpoint: 1: 5, 2: 7" in text
    assert "10 regenerated" in text and "4 tool call" in text and "9 truncated" in text
    assert "**Warning:**" in text and "max_new_tokens" in text
    assert "| PLD (held-out NLL of the labels) | 1.5000 | 1.7500 |" in text
    assert f"tms report {out}" in text
    assert (out / "tms" / "summary.md").read_text() == text
