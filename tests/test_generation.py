"""Generation (generation.py) and the regenerate stage (regenerate.py) with the real tiny model on
CPU: per-request seeded sampling that does not depend on the batch, the rank or a restart."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import binomtest

from conftest import LEAKY_GENERATION_CONFIG, repeated_tokens, sharpened_copy
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.generation import (
    SAMPLING_PROTOCOL,
    GenerationRequest,
    HFGenerator,
    SamplingSettings,
    finish,
)
from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.regenerate import owner_rank, regenerate

SAMPLE = SamplingSettings(temperature=1.0, top_p=1.0)
QUESTIONS = [
    "Hi",
    "What is 2+2?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Name a colour.",
    "Tell me a long story about a dragon who lives in a castle by the sea, with a twist.",
    "Why?",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small for intra-op threads: on a busy 2-core machine
    OpenMP synchronisation made generation about 8x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A second real checkpoint: the tiny model with its own random output layer. Tied random
    embeddings make greedy decoding repeat the last token; this one gives varied sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    weight = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    model.lm_head.weight = torch.nn.Parameter(weight * 0.3)
    path = tmp_path_factory.mktemp("untied")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompt_ids(tokenizer, question: str) -> tuple[int, ...]:
    return tuple(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False))


def request(tokenizer, question: str, checkpoint: int = 1,
            max_new_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(f"key:{question}", checkpoint, prompt_ids(tokenizer, question),
                             max_new_tokens)


def run(generator, path, requests, settings=SAMPLE):
    answers = [label for batch in generator.generate(path, requests, settings) for label in batch]
    assert len(answers) == len(requests)
    return {(a.prompt_key, a.checkpoint): a for a in answers}


def greedy_tokens(model, ids, max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=2)
    return out[0, len(ids):].tolist()


# ---- per-request seeding ------------------------------------------------------------------


def test_same_request_gives_same_text_alone_and_inside_a_batch_of_other_lengths(
    tiny_model_dir, tokenizer
):
    target = request(tokenizer, QUESTIONS[1])
    others = [request(tokenizer, q, max_new_tokens=n) for q, n in zip(QUESTIONS[2:], (8, 3, 6, 1))]
    assert len({len(r.prompt_ids) for r in [target, *others]}) == 5, "left padding is exercised"
    alone = run(HFGenerator(batch_size=8), tiny_model_dir, [target])
    together = run(HFGenerator(batch_size=8), tiny_model_dir, [*others[:2], target, *others[2:]])
    in_pairs = run(HFGenerator(batch_size=2), tiny_model_dir, [*others, target])
    key = (target.prompt_key, 1)
    assert alone[key].text, "a sample at temperature 1 is not empty here"
    assert together[key] == alone[key]
    assert in_pairs[key] == alone[key]
    # every other request too: batch size 8 versus 2 changes every batch's company
    assert {k: together[k] for k in in_pairs} == in_pairs
    # each request stops at its own cap, whatever the longest cap in its batch
    for r in others:
        answer = together[(r.prompt_key, 1)]
        assert answer.prompt_tokens == len(r.prompt_ids)
        assert answer.num_tokens <= r.max_new_tokens
        assert answer.finish_reason == "stop" or answer.num_tokens == r.max_new_tokens


def test_different_checkpoints_for_the_same_prompt_get_different_seeds_and_samples(
    tiny_model_dir, tokenizer
):
    per_checkpoint = [request(tokenizer, QUESTIONS[1], checkpoint=t) for t in range(1, 11)]
    assert len({r.seed for r in per_checkpoint}) == 10
    assert per_checkpoint[0].seed == request(tokenizer, QUESTIONS[1], checkpoint=1).seed
    # same weights, different t: the seed alone makes the samples differ
    answers = run(HFGenerator(10), tiny_model_dir, per_checkpoint)
    texts = [answers[(r.prompt_key, r.checkpoint)].text for r in per_checkpoint]
    assert len(set(texts)) == 10


def test_seed_depends_on_the_prompt_key_not_on_the_cap():
    a = GenerationRequest("k1", 3, (1, 2, 3), 8)
    assert a.seed == GenerationRequest("k1", 3, (1, 2, 3), 64).seed
    assert a.seed != GenerationRequest("k2", 3, (1, 2, 3), 8).seed
    assert 0 <= a.seed < 2**60


# ---- continuous batching ------------------------------------------------------------------


def mixed_requests(tokenizer, checkpoint: int, n: int = 18) -> list[GenerationRequest]:
    """Prompts of six lengths with caps from 1 to 12 tokens: rows finish at different steps,
    so rows leave and join the batch, and the cache is padded and cut."""
    return [request(tokenizer, f"{QUESTIONS[i % 6]} ({i})", checkpoint, 1 + (5 * i) % 12)
            for i in range(n)]


def test_answers_do_not_depend_on_batch_size_window_or_company(untied_dir, tokenizer):
    requests = mixed_requests(tokenizer, 2)
    alone = run(HFGenerator(1), untied_dir, requests)  # batch 1: every request decoded alone
    assert len({a.text for a in alone.values()}) == len(requests)
    for batch_size, window in [(3, 4), (8, 5), (8, 4096)]:
        generator = HFGenerator(batch_size, window=window)
        answers = [label for batch in generator.generate(untied_dir, iter(requests), SAMPLE)
                   for label in batch]  # a one-shot iterator
        assert {(a.prompt_key, a.checkpoint): a for a in answers} == alone
        assert len(answers) == len(requests)
    others = [request(tokenizer, f"Something else {i}", 2, 10) for i in range(5)]
    mixed = run(HFGenerator(4), untied_dir, [*others, *requests[::2]])
    assert {k: mixed[k] for k in alone if k in mixed} == {k: alone[k] for k in
                                                        [(r.prompt_key, 2) for r in requests[::2]]}


def test_greedy_answers_equal_model_generate_while_rows_leave_and_join(untied_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype=torch.float32).eval()
    requests = mixed_requests(tokenizer, 2, 12)
    answers = {key: tokens for batch in HFGenerator(3).generate_tokens(
        untied_dir, requests, SamplingSettings(greedy=True)) for key, tokens in batch.items()}
    for r in requests:  # plain `generate`, one prompt at a time: no padding, no company
        assert answers[r.prompt_key] == tuple(greedy_tokens(model, list(r.prompt_ids),
                                                            r.max_new_tokens))


def test_a_finished_row_makes_room_for_the_next_request(tokenizer, model):
    from tms_axolotl_plugin.generation import ContinuousBatch, RequestSampler

    rows_per_step = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: rows_per_step.append(kwargs["input_ids"].shape),
        with_kwargs=True)
    ids = prompt_ids(tokenizer, "Hi")
    requests = [GenerationRequest("long", 1, ids, 10)] + [
        GenerationRequest(f"short {i}", 1, prompt_ids(tokenizer, QUESTIONS[i]), 2)
        for i in range(4)]
    try:
        batch = ContinuousBatch(model, "cpu", RequestSampler(SAMPLE), set(), pad_id=2)
        finished = [pair for pairs in batch.run(iter(requests), batch_size=2) for pair in pairs]
    finally:
        hook.remove()
    assert {r.prompt_key: len(tokens) for r, tokens in finished} == {
        r.prompt_key: r.max_new_tokens for r in requests}  # no EOS here: every row to its cap
    decode_rows = [shape[0] for shape in rows_per_step if shape[1] == 1]
    prefill_rows = [shape[0] for shape in rows_per_step if shape[1] > 1]
    # each short answer leaves after 2 tokens and the next request takes its place: the
    # batch takes as many steps as the long answer needs (static batches: 9 + 1 + 1)
    assert decode_rows == [2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert prefill_rows == [2, 1, 1, 1]


def test_requests_are_read_a_window_at_a_time(tiny_model_dir, tokenizer):
    pulled = []

    def requests():
        for i in range(40):
            pulled.append(i)
            yield GenerationRequest(f"k{i}", 1, prompt_ids(tokenizer, QUESTIONS[i % 6]), 1 + i % 4)

    batches = HFGenerator(4, window=8).generate(tiny_model_dir, requests(), SAMPLE)
    first = next(batches)
    assert len(pulled) == 8, "one window read before the first answers come back"
    rest = [label for batch in batches for label in batch]
    assert len(pulled) == 40 and len({a.prompt_key for a in [*first, *rest]}) == 40


def test_cpu_attention_gives_bit_for_bit_the_logits_of_transformers_sdpa(tiny_model_dir,
                                                                          tokenizer):
    from transformers import AutoModelForCausalLM, DynamicCache

    from tms_axolotl_plugin.generation import (
        CPU_ATTENTION,
        _share_kv_heads_in_cpu_attention,
    )

    models = [AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
              .eval() for _ in range(2)]
    _share_kv_heads_in_cpu_attention(models[1])
    assert models[1].config._attn_implementation == CPU_ATTENTION
    assert models[0].config._attn_implementation == "sdpa"
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS[:3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + list(p) for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = []
    for m in models:
        cache, steps = DynamicCache(config=m.config), []
        with torch.inference_mode():
            out = m(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                    past_key_values=cache)
            steps.append(out.logits[:, -1])
            for step in range(3):  # decode steps: one query against the padded cache
                full = torch.cat([mask, torch.ones(3, step + 1, dtype=torch.bool)], 1).long()
                out = m(input_ids=steps[-1].argmax(-1, keepdim=True), attention_mask=full,
                        position_ids=positions[:, -1:] + step + 1, past_key_values=cache)
                steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])


# ---- finish() -----------------------------------------------------------------------------


def test_finish_cuts_at_the_first_eos_and_marks_stop(tokenizer):
    r = GenerationRequest("k", 2, (1, 2, 3, 4), max_new_tokens=8)
    hello = tokenizer.encode("Hello world", add_special_tokens=False)
    raw = hello + [2, 9, 9, 2]  # EOS, then what a batch keeps generating (or padding)
    label = finish(r, raw, {2}, tokenizer.decode)
    assert (label.text, label.finish_reason) == ("Hello world", "stop")
    assert label.num_tokens == len(hello) + 1, "EOS counted"
    assert (label.prompt_key, label.checkpoint, label.prompt_tokens) == ("k", 2, 4)
    assert label.usable


def test_finish_marks_length_when_the_cap_is_hit_without_eos(tokenizer):
    r = GenerationRequest("k", 1, (1,), max_new_tokens=3)
    words = tokenizer.encode(" one two three four five", add_special_tokens=False)
    assert len(words) == 5
    label = finish(r, words + [2], {2}, tokenizer.decode)  # EOS only after the cap
    assert label.text == tokenizer.decode(words[:3])
    assert (label.finish_reason, label.num_tokens) == ("length", 3)
    assert not label.usable


def test_finish_with_eos_first_gives_an_empty_unusable_answer(tokenizer):
    label = finish(GenerationRequest("k", 1, (1,), 4), [2, 5, 6], {0, 2}, tokenizer.decode)
    assert (label.text, label.finish_reason, label.num_tokens) == ("", "stop", 1)
    assert not label.usable


def test_finish_accepts_any_of_several_eos_ids(tokenizer):
    label = finish(GenerationRequest("k", 1, (1,), 8), [28, 0, 29], {0, 2}, tokenizer.decode)
    assert label.finish_reason == "stop" and label.num_tokens == 2


# ---- regenerate() into a LabelStore -------------------------------------------------------


@pytest.fixture
def requests_two_checkpoints(tokenizer):
    return [request(tokenizer, q, checkpoint=t, max_new_tokens=4)
            for t in (1, 2) for q in QUESTIONS[:4]]


@pytest.fixture
def checkpoint_paths(tiny_model_dir, untied_dir):
    return {1: tiny_model_dir, 2: untied_dir}


def test_regenerate_then_again_generates_nothing_the_second_time(
    tmp_path, checkpoint_paths, requests_two_checkpoints
):
    store = LabelStore(tmp_path / "labels")
    first = regenerate(requests_two_checkpoints, checkpoint_paths, HFGenerator(4), SAMPLE, store)
    n = len(requests_two_checkpoints)
    assert (first.requested, first.already_stored, first.generated) == (n, 0, n)
    stored = store.load()
    assert first.generated_tokens == sum(label.num_tokens for label in stored.values())
    assert set(stored) == {(r.prompt_key, r.checkpoint) for r in requests_two_checkpoints}

    second = regenerate(requests_two_checkpoints, checkpoint_paths, HFGenerator(4), SAMPLE, store)
    assert (second.requested, second.already_stored, second.generated) == (n, n, 0)
    assert store.load() == stored


def test_two_ranks_cover_every_request_exactly_once(
    tmp_path, checkpoint_paths, requests_two_checkpoints
):
    store = LabelStore(tmp_path / "labels")
    reports = [regenerate(requests_two_checkpoints, checkpoint_paths, HFGenerator(4), SAMPLE,
                          store, rank=rank, world_size=2) for rank in (0, 1)]
    n = len(requests_two_checkpoints)
    assert all(r.requested > 0 for r in reports), "both ranks get work"
    assert sum(r.requested for r in reports) == n
    assert sum(r.generated for r in reports) == n

    written = []
    for rank in (0, 1):
        shard = store.directory / f"labels-rank{rank}.jsonl"
        keys = [(rec["prompt_key"], rec["checkpoint"])
                for rec in map(json.loads, shard.read_text().splitlines())]
        owners = {owner_rank(r, 2) for r in requests_two_checkpoints
                  if (r.prompt_key, r.checkpoint) in keys}
        assert owners == {rank}
        written += keys
    assert len(written) == len(set(written)) == n, "no request generated twice"
    assert set(written) == {(r.prompt_key, r.checkpoint) for r in requests_two_checkpoints}

    # One rank, from a store holding part of the work: it generates only the rest, and the
    # answers equal the two-rank ones (they depend neither on the rank count nor on a restart).
    single = LabelStore(tmp_path / "single")
    regenerate(requests_two_checkpoints[:3], checkpoint_paths, HFGenerator(4), SAMPLE, single)
    resumed = regenerate(requests_two_checkpoints, checkpoint_paths, HFGenerator(4), SAMPLE,
                         single)
    assert (resumed.already_stored, resumed.generated) == (3, n - 3)
    assert single.load() == store.load()


# ---- temperature and top_p ----------------------------------------------------------------


GREEDY_PROMPT = "The capital of France is Paris. The capital of Spain is"


def test_tiny_top_p_is_greedy_decoding(untied_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype=torch.float32).eval()
    ids = tokenizer.encode(GREEDY_PROMPT, add_special_tokens=False)
    target = GenerationRequest("greedy", 2, tuple(ids), 8)
    others = [request(tokenizer, q, checkpoint=2) for q in QUESTIONS[:3]]  # shorter: padded
    answers = run(HFGenerator(4), untied_dir, [target, *others], SamplingSettings(1.0, 1e-6))
    for r in [target, *others]:
        expected = greedy_tokens(model, list(r.prompt_ids), 8)
        assert len(set(expected)) > 1, "a varied greedy sequence, not one repeated token"
        assert answers[(r.prompt_key, 2)].text == tokenizer.decode(expected,
                                                                   skip_special_tokens=True)
    sampled = run(HFGenerator(1), untied_dir, [target])[("greedy", 2)]
    assert sampled.text != answers[("greedy", 2)].text, "top_p=1 really samples"


def test_tiny_temperature_is_greedy_decoding(untied_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype=torch.float32).eval()
    ids = tokenizer.encode(GREEDY_PROMPT, add_special_tokens=False)
    r = GenerationRequest("cold", 2, tuple(ids), 8)
    answer = run(HFGenerator(1), untied_dir, [r], SamplingSettings(1e-4, 1.0))[("cold", 2)]
    assert answer.text == tokenizer.decode(greedy_tokens(model, ids, 8), skip_special_tokens=True)


def _first_token_probabilities(model, ids, temperature, top_p):
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(0) - ordered  # mass of the more likely tokens
    keep = order[before < top_p]  # smallest set of top tokens with mass >= top_p
    nucleus = torch.zeros_like(probs)
    nucleus[keep] = probs[keep]
    return nucleus / nucleus.sum()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_samples_follow_the_tempered_nucleus_distribution(tiny_model_dir, tokenizer, model, top_p):
    """First tokens of 300 requests (300 seeds) against softmax(logits / T) on the top-p nucleus:
    the frequency of the most likely token matches, and nothing outside the nucleus appears."""
    temperature, n = 0.1, 300
    ids = prompt_ids(tokenizer, "a")
    expected = _first_token_probabilities(model, ids, temperature, top_p)
    top = int(expected.argmax())
    assert tokenizer.decode([top]) == "\n"
    requests = [GenerationRequest(f"seed-{i}", 1, ids, 1) for i in range(n)]
    answers = run(HFGenerator(n), tiny_model_dir, requests,
                  SamplingSettings(temperature, top_p)).values()
    hits = sum(a.text == "\n" for a in answers)
    assert binomtest(hits, n, float(expected[top])).pvalue > 0.001
    # the other setting's probability is rejected: the test can tell the two apart
    other = _first_token_probabilities(model, ids, temperature, 1.8 - top_p)
    assert binomtest(hits, n, float(other[top])).pvalue < 0.001
    allowed = {tokenizer.decode([t], skip_special_tokens=True)
               for t in torch.nonzero(expected).flatten().tolist()}
    assert {a.text for a in answers} <= allowed
    if top_p < 1.0:
        assert len(allowed) < 1000


# ---- every sampling parameter is ours, none from the checkpoint's generation_config ---------


@pytest.fixture(scope="module")
def leaky_checkpoints(tmp_path_factory, tiny_model_dir):
    """Two identical checkpoints whose generation_config.json sets top_k 1, min_p 0.9,
    repetition_penalty 1.5 and no_repeat_ngram_size 1, and the same weights without them."""
    root = tmp_path_factory.mktemp("generation_config")
    leaky = {t: sharpened_copy(tiny_model_dir, root / f"checkpoint-{t}", LEAKY_GENERATION_CONFIG)
             for t in (1, 2)}
    return leaky, sharpened_copy(tiny_model_dir, root / "plain")


def answer_tokens(path, requests, settings=SAMPLE) -> dict:
    return {key: tokens for batch in HFGenerator(8).generate_tokens(path, requests, settings)
            for key, tokens in batch.items()}


def test_a_checkpoints_generation_config_does_not_change_its_answers(tokenizer,
                                                                      leaky_checkpoints):
    leaky, plain = leaky_checkpoints
    prompts = [prompt_ids(tokenizer, f"Question {i}: tell me something.") for i in range(8)]
    requests = {t: [GenerationRequest(f"q{i}", t, ids, 24) for i, ids in enumerate(prompts)]
                for t in (1, 2)}
    first, second = (answer_tokens(leaky[t], requests[t]) for t in (1, 2))
    # top_k 1 or min_p 0.9 would make identical weights answer alike whatever the seed
    assert sum(first[k] != second[k] for k in first) >= 6
    # no_repeat_ngram_size 1 would forbid every repeat; plain samples of this model repeat
    repeats = [repeated_tokens(a) for a in [*first.values(), *second.values()]]
    assert sum(r > 0 for r in repeats) >= 12 and sum(repeats) >= 100, repeats
    # exactly the answers of the same weights without those settings (no penalty either)
    assert first == answer_tokens(plain, requests[1])
    greedy = SamplingSettings(greedy=True)  # the retention probe's reference answers
    assert answer_tokens(leaky[1], requests[1], greedy) == answer_tokens(plain, requests[1],
                                                                         greedy)


def test_penalties_count_each_rows_own_prompt_and_answer():
    from tms_axolotl_plugin.generation import RequestPenalties

    settings = SamplingSettings(repetition_penalty=2.0, presence_penalty=0.5,
                                frequency_penalty=0.25)
    scores = torch.tensor([[1.0] * 8, [-1.0] * 8])
    out = RequestPenalties(settings)(scores, [(5, 6), (1, 2, 3, 4)], [[7, 7], [5, 0]])
    # row 0: prompt {5, 6} and answer {7, 7}; the other row's tokens count for nothing
    assert out[0].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5 - 0.5 - 2 * 0.25]
    # row 1: prompt {1, 2, 3, 4}, answer {5, 0}; negative logits are multiplied
    assert out[1].tolist() == [-2.0 - 0.75, -2.0, -2.0, -2.0, -2.0, -2.0 - 0.75, -1.0, -1.0]


def test_user_set_truncation_and_penalties_apply_per_request(leaky_checkpoints, tokenizer):
    _, plain = leaky_checkpoints
    target = request(tokenizer, QUESTIONS[1], max_new_tokens=16)
    others = [request(tokenizer, q, max_new_tokens=16) for q in QUESTIONS[2:5]]
    tuned = SamplingSettings(top_k=5, min_p=0.05, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=0.5)
    alone = answer_tokens(plain, [target], tuned)
    assert alone == {k: v for k, v in answer_tokens(plain, [*others, target], tuned).items()
                     if k == target.prompt_key}, "padding and company change nothing"
    assert alone != answer_tokens(plain, [target])
    # top_k 1 is greedy decoding; a strong repetition penalty stops greedy's repeats
    assert answer_tokens(plain, [target], SamplingSettings(top_k=1)) == \
        answer_tokens(plain, [target], SamplingSettings(greedy=True))
    greedy = answer_tokens(plain, [target, *others], SamplingSettings(greedy=True))
    unrepeated = answer_tokens(plain, [target, *others],
                               SamplingSettings(greedy=True, repetition_penalty=1e3))
    assert all(repeated_tokens(a) > 0 for a in greedy.values())
    assert all(repeated_tokens(a) == 0 for a in unrepeated.values())


def test_sampling_settings_come_from_the_config_and_are_stated_in_full():
    from tms_axolotl_plugin.config import GenerationConfig

    settings = SamplingSettings.from_config(GenerationConfig(top_k=40, repetition_penalty=1.1))
    assert settings.as_dict() == {
        "protocol": SAMPLING_PROTOCOL, "decoding": "sample", "temperature": 1.0, "top_p": 1.0,
        "top_k": 40, "min_p": 0.0, "repetition_penalty": 1.1, "presence_penalty": 0.0,
        "frequency_penalty": 0.0}
    assert SamplingSettings.from_config(GenerationConfig()) == SamplingSettings()
    assert SamplingSettings(greedy=True).as_dict()["temperature"] == 0.0


def test_regenerate_records_the_sampling_settings_and_refuses_others(
    tmp_path, checkpoint_paths, requests_two_checkpoints
):
    store = LabelStore(tmp_path / "labels")
    requests = requests_two_checkpoints[:2]
    regenerate(requests, checkpoint_paths, HFGenerator(4), SAMPLE, store)
    record = json.loads((store.directory / "sampling.json").read_text())
    assert record == SAMPLE.as_dict()
    with pytest.raises(TMSError, match="sampled with"):
        regenerate(requests, checkpoint_paths, HFGenerator(4),
                   SamplingSettings(repetition_penalty=1.05), store)


def test_vllm_engines_run_on_every_node_one_per_gpu_group():
    from tms_axolotl_plugin.errors import TMSError
    from tms_axolotl_plugin.regenerate import vllm_engine_ranks

    assert vllm_engine_ranks(16, 8, 1) == list(range(16))  # 2 nodes x 8 GPUs
    assert vllm_engine_ranks(16, 8, 2) == [0, 2, 4, 6, 8, 10, 12, 14]  # tensor parallel 2
    assert vllm_engine_ranks(8, 8, 8) == [0]
    with pytest.raises(TMSError, match="tms.sidecar.engines: one"):
        vllm_engine_ranks(8, 8, 3)


def test_an_engines_gpus_are_named_as_the_launcher_named_them():
    from tms_axolotl_plugin.regenerate import engine_devices

    assert engine_devices(10, 8, 2, None) == "2,3"  # node 1, local ranks 2 and 3
    assert engine_devices(1, 4, 1, "4,5,6,7") == "5"
    assert engine_devices(2, 4, 2, "GPU-a, GPU-b, GPU-c, GPU-d") == "GPU-c,GPU-d"


@pytest.mark.parametrize("counts,workers", [
    ([(t, 40) for t in range(1, 11)], 8),             # T=10 on 8 engines
    ([(t, 1000 + 7 * (t % 3) - 9 * (t % 2)) for t in range(1, 11)], 8),  # ... as drawn
    ([(t, 40) for t in range(1, 5)], 8),              # fewer checkpoints than engines
    ([(1, 7), (2, 300), (3, 1), (4, 55), (6, 13)], 3),  # uneven checkpoints
    ([(1, 5)], 8),                                    # fewer items than engines
])
def test_checkpoint_spans_partition_the_items_evenly_over_few_checkpoints(counts, workers):
    import math

    from tms_axolotl_plugin.regenerate import checkpoint_spans

    shares = [checkpoint_spans(counts, w, workers) for w in range(workers)]
    covered = {t: [] for t, _ in counts}
    for share in shares:
        for t, start, stop in share:
            covered[t].append((start, stop))
    for t, n in counts:  # every item of every checkpoint exactly once
        positions = sorted(p for start, stop in covered[t] for p in range(start, stop))
        assert positions == list(range(n)), (t, covered[t])
    sizes = [sum(stop - start for _, start, stop in share) for share in shares]
    mean = sum(sizes) / workers
    assert max(sizes) <= 1.1 * mean + 1 and min(sizes) >= 0.9 * mean - 1, sizes
    # Loads in all: each checkpoint once, plus one per span boundary inside a checkpoint.
    assert sum(map(len, shares)) <= len(counts) + workers - 1, shares
    sizes_of = [n for _, n in counts]
    if max(sizes_of) <= 1.04 * min(sizes_of):  # nearly equal checkpoints: few loads each
        most = math.ceil(len(counts) / workers) + 1
        assert all(len(share) <= most for share in shares), shares
    if len(counts) == 10 and workers == 8:
        assert max(len(share) for share in shares) == 2  # at most two loads per engine
