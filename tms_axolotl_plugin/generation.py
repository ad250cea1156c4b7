"""Generation backends: how a checkpoint answers prompts.

`GenerationBackend` is the interface the regenerate stage drives; `HFGenerator` is the embedded
default (in-process transformers, batched, left-padded). The vLLM sidecar backend implements
the same interface.

Sampling is seeded per request, not per batch: each answer is an exact sample of
softmax(logits / temperature) restricted to the top-p nucleus, drawn with the Gumbel-max trick
from noise that depends only on (request seed, step). So an answer does not depend on which
other requests share its batch, on the number of ranks, or on a restart in the middle.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax decoding (reference answers), ignores temperature/top_p


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
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        model, tokenizer, device = self._load(Path(checkpoint_path))
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)

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
                processors = LogitsProcessorList()
                if not settings.greedy:
                    processors.append(TemperatureLogitsWarper(settings.temperature))
                    if settings.top_p < 1.0:
                        processors.append(TopPLogitsWarper(settings.top_p))
                    processors.append(PerRequestGumbelNoise([r.seed for r in batch], width))
                with torch.inference_mode():
                    output = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        do_sample=False,
                        max_new_tokens=max(r.max_new_tokens for r in batch),
                        logits_processor=processors,
                        eos_token_id=sorted(eos_ids),
                        pad_token_id=pad_id,
                        temperature=None, top_p=None, top_k=None,
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
