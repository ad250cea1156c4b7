"""The retention probe's reference: the base model's own answers to off-task prompts.

Generated once (greedy, so the reference is the base model's most likely behaviour; with the
same explicit, neutral settings as regeneration, so no repetition penalty or n-gram ban of the
checkpoint's generation_config applies) and cached under the run's `tms/retention/`, keyed by
the base model, the prompts, the chat template, the answer length and the decoding settings.
Training then scores these answers with `pld.mean_answer_nll`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tms_axolotl_plugin.errors import TMSConfigError
from tms_axolotl_plugin.fingerprint import fingerprint, model_dir_digest
from tms_axolotl_plugin.generation import GenerationRequest, HFGenerator, SamplingSettings
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.pld import ScoredAnswer, load_scored_answers, save_scored_answers

LOG = get_logger(__name__)
REFERENCE_DECODING = SamplingSettings(greedy=True)


def load_retention_prompts(source: str | None, limit: int) -> list[str]:
    """The shipped general prompts, or a user's .txt (one per line) / .jsonl file."""
    if source is None:
        text = resources.files("tms_axolotl_plugin").joinpath("data/retention_prompts.txt")
        prompts = [line.strip() for line in text.read_text().splitlines() if line.strip()]
    else:
        path = Path(source)
        if not path.exists():
            raise TMSConfigError(f"tms.retention.prompts: {source!r} does not exist")
        if path.suffix == ".jsonl":
            prompts = []
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if "prompt" in row:
                    prompts.append(row["prompt"])
                elif "messages" in row:
                    prompts.append(next(m["content"] for m in row["messages"]
                                        if m["role"] == "user"))
                else:
                    raise TMSConfigError(f"{source}: each row needs a `prompt` or `messages`")
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit]


def base_answers_path(cfg, tokenizer, prompts: list[str], max_new_tokens: int,
                      cache_dir: Path) -> Path:
    """Where the base-model answers for these inputs are cached (the same on every rank)."""
    template = getattr(tokenizer, "chat_template", None)
    key = fingerprint(model_dir_digest(Path(cfg.base_model)), prompts, max_new_tokens, template,
                      REFERENCE_DECODING.as_dict())  # with the protocol: older caches not reused
    return cache_dir / f"base-answers-{key}.jsonl"


def ensure_base_answers(cfg, tokenizer, prompts: list[str], max_new_tokens: int,
                        path: Path) -> Path:
    """The cached base-model answers at `path`, generating them on the first call."""
    cache_dir = path.parent
    if path.exists():
        LOG.info("tms retention: using %d cached base-model answers (%s)",
                 len(load_scored_answers(path)), path.name)
        return path
    prompt_ids = [
        tuple(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False))
        for p in prompts
    ]
    requests = [GenerationRequest(fingerprint(ids), 0, ids, max_new_tokens) for ids in prompt_ids]
    generator = HFGenerator(batch_size=16, dtype="auto", base_model=cfg.base_model)
    answers: dict[str, tuple[int, ...]] = {}
    for batch in generator.generate_tokens(Path(cfg.base_model), requests,
                                           REFERENCE_DECODING):
        answers.update(batch)
    scored = [ScoredAnswer(r.prompt_ids, answers[r.prompt_key]) for r in requests]
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_scored_answers(path, scored)
    LOG.info("tms retention: generated %d base-model answers (%s)", len(scored), path.name)
    return path
