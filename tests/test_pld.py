"""mean_answer_nll against a plain per-example computation with transformers."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tms_axolotl_plugin.pld import ScoredAnswer, mean_answer_nll


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def answers_of_mixed_lengths(count: int = 11) -> list[ScoredAnswer]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for i in range(count):
        prompt = torch.randint(3, 49000, (5 + (7 * i) % 23,), generator=generator).tolist()
        answer = torch.randint(3, 49000, (2 + (5 * i) % 17,), generator=generator).tolist()
        rows.append(ScoredAnswer(tuple(prompt), tuple(answer)))
    return rows


def one_by_one(model, answers, max_length=None) -> float:
    """Sum of answer-token NLLs over examples, each scored alone with full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for item in answers:
            ids = list(item.prompt_ids) + list(item.answer_ids)
            labels = [-100] * len(item.prompt_ids) + list(item.answer_ids)
            if max_length:
                ids, labels = ids[:max_length], labels[:max_length]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_answer_nll_equals_scoring_each_example_alone(tiny_model, batch_size):
    answers = answers_of_mixed_lengths()
    expected = one_by_one(tiny_model, answers)
    assert mean_answer_nll(tiny_model, answers, batch_size) == pytest.approx(expected, rel=1e-5)


def test_truncation_to_max_length_masks_what_falls_outside(tiny_model):
    answers = answers_of_mixed_lengths()
    expected = one_by_one(tiny_model, answers, max_length=20)
    got = mean_answer_nll(tiny_model, answers, batch_size=4, max_length=20)
    assert got == pytest.approx(expected, rel=1e-5)


def test_rank_shares_cover_every_answer_once(tiny_model):
    """Without a process group each rank returns its own share's mean; weighted by token
    counts, the shares recombine to the full mean."""
    answers = answers_of_mixed_lengths(9)
    shares = sorted(answers, key=lambda a: len(a.prompt_ids) + len(a.answer_ids))
    total, tokens = 0.0, 0
    for rank in range(2):
        mine = shares[rank::2]
        count = sum(len(a.answer_ids) for a in mine)  # every answer token is predicted
        total += mean_answer_nll(tiny_model, answers, 2, rank=rank, world_size=2) * count
        tokens += count
    assert total / tokens == pytest.approx(one_by_one(tiny_model, answers), rel=1e-5)


def test_no_answers_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="at least one answer"):
        mean_answer_nll(tiny_model, [])
