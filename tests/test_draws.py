"""The mixture draws (draws.py): label coin with probability alpha, else a checkpoint uniform over
1..T, fixed by the seed before any generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, chisquare

from tms_axolotl_plugin.draws import LABEL, DrawPlan, draw_targets

N, EPOCHS, T = 5000, 2, 10


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.9])
def test_label_fraction_is_consistent_with_alpha(alpha):
    plan = draw_targets(N, EPOCHS, T, alpha, seed=11)
    labels = int((plan.targets == LABEL).sum())
    assert binomtest(labels, plan.targets.size, alpha).pvalue > 0.001
    assert plan.label_fraction() == pytest.approx(labels / plan.targets.size)


def test_alpha_zero_never_keeps_the_label_and_alpha_one_always_does():
    assert (draw_targets(500, 2, T, 0.0, seed=1).targets != LABEL).all()
    always = draw_targets(500, 2, T, 1.0, seed=1)
    assert (always.targets == LABEL).all()
    assert always.needed_pairs() == []


def test_drawn_checkpoints_are_uniform_over_1_to_T():
    plan = draw_targets(N, EPOCHS, T, 0.25, seed=3)
    drawn = plan.targets[plan.targets != LABEL]
    assert drawn.min() >= 1 and drawn.max() <= T
    counts = np.bincount(drawn, minlength=T + 1)[1:]
    assert (counts > 0).all()
    assert chisquare(counts).pvalue > 0.001


def test_plan_has_one_target_per_example_and_epoch():
    plan = draw_targets(7, 3, 4, 0.25, seed=0)
    assert plan.targets.shape == (7, 3)
    assert (plan.num_examples, plan.num_epochs, plan.num_checkpoints) == (7, 3, 4)
    assert plan.targets.dtype == np.int16


def test_same_seed_gives_identical_plan():
    a = draw_targets(1000, 2, T, 0.25, seed=42)
    b = draw_targets(1000, 2, T, 0.25, seed=42)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.needed_pairs() == b.needed_pairs()


def test_different_seed_gives_different_plan():
    a = draw_targets(1000, 2, T, 0.25, seed=42)
    b = draw_targets(1000, 2, T, 0.25, seed=43)
    assert not np.array_equal(a.targets, b.targets)
    # not a small perturbation: about as many disagreements as two independent plans have
    assert (a.targets != b.targets).mean() > 0.5


def test_changing_alpha_keeps_drawn_checkpoints():
    low = draw_targets(N, EPOCHS, T, 0.25, seed=5)
    high = draw_targets(N, EPOCHS, T, 0.6, seed=5)
    both_regenerated = (low.targets != LABEL) & (high.targets != LABEL)
    assert both_regenerated.sum() > 0.3 * low.targets.size
    np.testing.assert_array_equal(low.targets[both_regenerated], high.targets[both_regenerated])
    # one coin per (example, epoch): raising alpha only turns more draws into labels
    assert ((low.targets == LABEL) <= (high.targets == LABEL)).all()
    # so the answers the higher-alpha plan needs are a subset of what the lower one generated
    assert set(high.needed_pairs()) <= set(low.needed_pairs())


def test_needed_pairs_are_the_distinct_drawn_example_checkpoint_pairs():
    plan = draw_targets(300, 3, 5, 0.25, seed=9)
    expected = {
        (i, int(plan.targets[i, e]))
        for i in range(plan.num_examples)
        for e in range(plan.num_epochs)
        if plan.targets[i, e] != LABEL
    }
    pairs = plan.needed_pairs()
    assert len(pairs) == len(set(pairs)) == len(expected)
    assert set(pairs) == expected
    assert pairs == sorted(pairs, key=lambda p: (p[1], p[0])), "by checkpoint, then example"


def test_needed_pairs_per_prompt_matches_the_expected_144_at_T10_alpha025_two_epochs():
    # E[distinct checkpoints per prompt] = T * (1 - (1 - (1 - alpha) / T) ** epochs)
    expected = T * (1 - (1 - 0.75 / T) ** 2)
    assert expected == pytest.approx(1.44375)
    plan = draw_targets(N, 2, T, 0.25, seed=21)
    per_prompt = len(plan.needed_pairs()) / N
    # per-prompt count is 0, 1 or 2 (sd < 0.7): 5000 prompts give a standard error < 0.01
    assert per_prompt == pytest.approx(expected, abs=0.05)
    savings = plan.savings()
    assert savings["generations"] == len(plan.needed_pairs())
    assert savings["all_checkpoints_generations"] == N * T
    assert savings["saved"] == N * T - savings["generations"]
    assert savings["per_prompt"] == pytest.approx(per_prompt)


def test_all_checkpoints_option_needs_every_example_checkpoint_pair():
    plan = draw_targets(40, 2, 6, 0.25, seed=2, all_checkpoints=True)
    pairs = plan.needed_pairs()
    assert len(pairs) == 40 * 6
    assert set(pairs) == {(i, t) for i in range(40) for t in range(1, 7)}
    lazy = draw_targets(40, 2, 6, 0.25, seed=2)
    np.testing.assert_array_equal(plan.targets, lazy.targets)  # same draws, more answers
    assert set(lazy.needed_pairs()) <= set(pairs)


def test_iterative_schedule_uses_only_the_last_checkpoint():
    plan = draw_targets(2000, 2, T, 0.25, seed=4, schedule="iterative")
    drawn = plan.targets[plan.targets != LABEL]
    assert drawn.size > 0 and (drawn == T).all()
    assert {t for _, t in plan.needed_pairs()} == {T}
    offline = draw_targets(2000, 2, T, 0.25, seed=4)
    # same label coins as the offline schedule with the same seed
    np.testing.assert_array_equal(plan.targets == LABEL, offline.targets == LABEL)


def test_zero_examples_gives_an_empty_plan():
    plan = draw_targets(0, 2, T, 0.25, seed=0)
    assert plan.targets.shape == (0, 2)
    assert plan.needed_pairs() == []
    assert plan.label_fraction() == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_examples": -1},
        {"num_epochs": 0},
        {"num_checkpoints": 0},
        {"schedule": "online"},
        {"alpha": -0.1},
        {"alpha": 1.5},
        {"alpha": math.nan},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_arguments_raise_value_error(kwargs):
    args = {"num_examples": 10, "num_epochs": 2, "num_checkpoints": T, "alpha": 0.25, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError):
        draw_targets(**args)


def test_draw_plan_is_a_plain_record_of_the_targets():
    targets = np.array([[0, 3], [2, 2], [0, 0]], dtype=np.int16)
    plan = DrawPlan(targets, num_checkpoints=3)
    assert plan.needed_pairs() == [(1, 2), (0, 3)]
    assert plan.label_fraction() == pytest.approx(3 / 6)
