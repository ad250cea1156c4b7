"""Generation backends: how a checkpoint answers prompts.

`GenerationBackend` is the interface the regenerate stage drives; `HFGenerator` is the embedded
default (in-process transformers, batched, left-padded). The vLLM sidecar backend implements
the same interface.

Sampling is seeded per request, not per batch: each answer is an exact sample of
softmax(logits / temperature) restricted to the top-p nucleus, drawn with the Gumbel-max trick
from noise that depends only on (request seed, step). So an answer does not depend on which
other requests share its batch, on the number of ranks, or on a restart in the middle.

Every sampling parameter is ours (`SamplingSettings`, from `tms.generation`): nothing comes
from the checkpoint's generation_config.json, whose top_k, repetition penalty, n-gram bans etc.
would make the answers something other than samples of the checkpoint's policy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tms_axolotl_plugin.fingerprint import fingerprint
from tms_axolotl_plugin.label_store import GeneratedLabel
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_key: str
    checkpoint: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def seed(self) -> int:
        """Depends only on the (prompt, checkpoint) pair, so answers are stable across runs."""
        return int(fingerprint(self.prompt_key, self.checkpoint)[:15], 16)


# Version of how requests are sampled; recorded with the labels and counted in the generation
# fingerprint and the retention cache key. 1: unstated parameters were left to the checkpoint's
# generation_config.json (e.g. Qwen2.5-Instruct's top_k 20, repetition_penalty 1.05).
# 2: every parameter is stated, with neutral defaults.
SAMPLING_PROTOCOL = 2


@dataclass(frozen=True)
class SamplingSettings:
    """The complete sampling parameters of a request; the neutral defaults are a plain sample
    of the policy. The order of application follows vLLM: penalties, temperature, min_p,
    top_k, top_p."""

    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax decoding (reference answers): temperature and truncation off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and answer tokens
    presence_penalty: float = 0.0  # over answer tokens
    frequency_penalty: float = 0.0  # over answer tokens

    @classmethod
    def from_config(cls, generation) -> SamplingSettings:
        """From the `tms.generation` section (a `GenerationConfig`)."""
        return cls(temperature=generation.temperature, top_p=generation.top_p,
                   top_k=generation.top_k, min_p=generation.min_p,
                   repetition_penalty=generation.repetition_penalty,
                   presence_penalty=generation.presence_penalty,
                   frequency_penalty=generation.frequency_penalty)

    def as_dict(self) -> dict:
        """The exact parameters requests are sampled with (what is recorded with the labels).
        Greedy decoding is temperature 0 with truncation off, as vLLM defines it."""
        return {
            "protocol": SAMPLING_PROTOCOL,
            "decoding": "greedy" if self.greedy else "sample",
            "temperature": 0.0 if self.greedy else float(self.temperature),
            "top_p": 1.0 if self.greedy else float(self.top_p),
            "top_k": 0 if self.greedy else int(self.top_k),
            "min_p": 0.0 if self.greedy else float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
        }


class GenerationBackend(Protocol):
    name: str

    def generate(
        self, checkpoint_path: Path, requests: list[GenerationRequest], settings: SamplingSettings
    ) -> Iterator[list[GeneratedLabel]]:
        """Answer every request with the given checkpoint; yield answers batch by batch."""

    def generate_many(
        self, jobs: list[tuple[Path, list[GenerationRequest]]], settings: SamplingSettings
    ) -> Iterator[list[GeneratedLabel]]:
        """Answer (checkpoint, requests) jobs; a backend may serve them all at once."""

    def close(self) -> None: ...


def finish(request: GenerationRequest, tokens: list[int], eos_ids: set[int],
           decode) -> GeneratedLabel:
    """Cut a raw continuation at the first EOS or at the request's own token cap."""
    tokens = tokens[: request.max_new_tokens]
    for position, token in enumerate(tokens):
        if token in eos_ids:
            answer = tokens[:position]
            return GeneratedLabel(request.prompt_key, request.checkpoint, decode(answer), "stop",
                                  position + 1, len(request.prompt_ids))
    return GeneratedLabel(request.prompt_key, request.checkpoint, decode(tokens), "length",
                          len(tokens), len(request.prompt_ids))


class HFGenerator:
    """In-process transformers generation (CPU, or the rank's own GPU)."""

    name = "hf"

    def __init__(self, batch_size: int, dtype: str = "auto", base_model: str | None = None):
        self.batch_size = batch_size
        self.dtype = dtype
        self.base_model = base_model  # needed to load LoRA checkpoints

    def _load(self, checkpoint_path: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tms_axolotl_plugin.ranks import local_rank

        device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32
        if self.dtype == "bfloat16" or (self.dtype == "auto" and device != "cpu"):
            dtype = torch.bfloat16
        is_adapter = (checkpoint_path / "adapter_config.json").exists()
        if is_adapter:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=dtype)
            model = PeftModel.from_pretrained(model, str(checkpoint_path)).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(checkpoint_path), dtype=dtype)
        tokenizer_source = checkpoint_path
        if not (checkpoint_path / "tokenizer_config.json").exists() and self.base_model:
            tokenizer_source = Path(self.base_model)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
        return model.to(device).eval(), tokenizer, device

    def _continuations(self, checkpoint_path, requests, settings):
        """Yield (batch of requests, raw continuations, EOS ids, decode) batch by batch."""
        import torch

        model, tokenizer, device = self._load(Path(checkpoint_path))
        # The checkpoint's generation_config is read for its EOS ids only.
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        plain = plain_generation_config(sorted(eos_ids), pad_id)
        # transformers fills what a passed generation_config leaves unset (5.x: None fields) or
        # at the global default (4.5x) from `model.generation_config`; with ours in its place
        # that merge copies our own values, so no checkpoint setting can come back.
        model.generation_config = plain

        def decode(tokens):
            return tokenizer.decode(tokens, skip_special_tokens=True)

        # Similar lengths together: less padding.
        ordered = sorted(requests, key=lambda r: (len(r.prompt_ids), r.prompt_key))
        try:
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                width = max(len(r.prompt_ids) for r in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, request in enumerate(batch):
                    input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
                    attention[row, width - len(request.prompt_ids):] = 1
                config = copy.deepcopy(plain)
                config.max_new_tokens = max(r.max_new_tokens for r in batch)
                with torch.inference_mode():
                    output = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        generation_config=config,
                        logits_processor=logits_processors(settings, batch, width),
                    )
                yield batch, output[:, width:].tolist(), eos_ids, decode
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def generate(self, checkpoint_path, requests, settings):
        for batch, continuations, eos_ids, decode in self._continuations(
                checkpoint_path, requests, settings):
            yield [finish(r, c, eos_ids, decode) for r, c in zip(batch, continuations, strict=True)]

    def generate_many(self, jobs, settings):
        for checkpoint_path, requests in jobs:  # one model in memory at a time
            yield from self.generate(checkpoint_path, requests, settings)

    def generate_tokens(self, checkpoint_path, requests, settings):
        """Like `generate`, but yield {prompt_key: answer token ids, EOS included if reached}."""
        for batch, continuations, eos_ids, _ in self._continuations(
                checkpoint_path, requests, settings):
            answers = {}
            for request, tokens in zip(batch, continuations, strict=True):
                tokens = tokens[: request.max_new_tokens]
                end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
                answers[request.prompt_key] = tuple(tokens[:end])
            yield answers

    def close(self) -> None:
        pass


class PerRequestGumbelNoise:
    """Adds Gumbel noise seeded by (request seed, step); greedy decoding then samples exactly."""

    def __init__(self, seeds: list[int], prompt_width: int):
        self.seeds = seeds
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_width
        noise = torch.empty(scores.shape, dtype=torch.float32)
        for row, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed((seed + 7919 * step) % (2**63 - 1))
            noise[row].exponential_(generator=generator)
        # argmax(logits + Gumbel) with Gumbel = -log(Exp(1)) samples from softmax(logits).
        return scores.float() - noise.log().to(scores.device)


def plain_generation_config(eos_ids: list[int], pad_id: int):
    """A `transformers.GenerationConfig` built from scratch: argmax over the scores our own
    processors produce (the Gumbel noise makes that a sample), stopping at EOS or the cap.
    Every field that could add a logits processor or a stopping rule is stated neutral, none
    is taken from the checkpoint (repetition penalty, n-gram bans, bad words, suppressed or
    forced tokens, minimum lengths, length decay, sequence bias, stop strings, ...)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, num_beams=1, num_return_sequences=1, use_cache=True,
        eos_token_id=eos_ids, pad_token_id=pad_id,
        min_length=0,  # min_new_tokens stays unset (None): no minimum
        repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        bad_words_ids=None, sequence_bias=None, suppress_tokens=None,
        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
        exponential_decay_length_penalty=None, remove_invalid_values=False,
        renormalize_logits=False, guidance_scale=None, stop_strings=None, max_time=None,
        watermarking_config=None, output_scores=False, return_dict_in_generate=False,
    )


def logits_processors(settings: SamplingSettings, batch: list[GenerationRequest], width: int):
    """Our processors, in vLLM's order: penalties, temperature, min_p, top_k, top_p, then the
    per-request Gumbel noise (greedy: penalties only)."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if (settings.repetition_penalty != 1.0 or settings.presence_penalty != 0.0
            or settings.frequency_penalty != 0.0):
        processors.append(RequestPenalties(settings, [len(r.prompt_ids) for r in batch], width))
    if settings.greedy:
        return processors
    processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.min_p > 0.0:
        processors.append(MinPLogitsWarper(settings.min_p))
    if settings.top_k > 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))
    processors.append(PerRequestGumbelNoise([r.seed for r in batch], width))
    return processors


class RequestPenalties:
    """vLLM's penalties, per row of a left-padded batch (padding never counts): the repetition
    penalty over the row's prompt and answer tokens, presence and frequency over its answer."""

    def __init__(self, settings: SamplingSettings, prompt_lengths: list[int], prompt_width: int):
        self.settings = settings
        self.prompt_lengths = prompt_lengths
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores):
        import torch

        s = self.settings
        scores = scores.float()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        starts = self.prompt_width - torch.tensor(self.prompt_lengths, device=input_ids.device)
        in_row = (positions[None, :] >= starts[:, None]).float()
        answer = (positions >= self.prompt_width).float().expand_as(in_row)
        seen = torch.zeros_like(scores).scatter_add_(1, input_ids, in_row) > 0
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, answer)
        if s.repetition_penalty != 1.0:
            penalised = torch.where(scores > 0, scores / s.repetition_penalty,
                                    scores * s.repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        return scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
