"""Generation backends: how a checkpoint answers prompts.

`GenerationBackend` is the interface the regenerate stage drives; `HFGenerator` is the embedded
default (in-process transformers, continuously batched). The vLLM sidecar backend implements
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

import functools
import itertools
from collections.abc import Iterable, Iterator
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
    """In-process transformers generation (CPU, or the rank's own GPU), continuously batched.

    Up to `batch_size` requests decode together, one token each per step, over one KV cache. A
    request leaves the batch at its own EOS or cap, and once a quarter of the places are free
    the next requests are prefilled and join, so the batch stays full until the requests run
    out (a static batch waits for its longest answer). Requests are read in windows of
    `window`, each sorted by prompt length (less padding), so an iterator of any size is never
    held whole; answers are yielded as they finish, not in request order.

    Exact: the noise of a request's step t depends only on (its seed, t), each row's penalties
    count only its own prompt and answer, and decoding is deterministic (the same requests in
    the same order give the same answers, bit for bit). Up to floating point: a row's logits
    are computed in a batch whose size, padding and cache width depend on its company (matrix
    kernels block by batch size; masked columns change the order of attention's sums), so they
    can differ in the last bits from the same request decoded alone. An answer changes only if
    such a difference flips a choice, which takes a near-tie (between the two best logits when
    greedy, the two best noisy scores when sampling): rare, and not seen in the tests, which
    compare answers across batch sizes, company and plain `model.generate`.
    """

    name = "hf"

    def __init__(self, batch_size: int, dtype: str = "auto", base_model: str | None = None,
                 window: int = 4096):
        self.batch_size = batch_size
        self.dtype = dtype
        self.base_model = base_model  # needed to load LoRA checkpoints
        self.window = window  # requests read (and sorted by prompt length) at a time

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
        model = model.to(device).eval()
        if device == "cpu":
            _share_kv_heads_in_cpu_attention(model)
            _prepack_cpu_linears(model, self.batch_size)
        return model, tokenizer, device

    def _continuations(self, checkpoint_path, requests: Iterable[GenerationRequest], settings):
        """Yield (finished requests, their raw continuations, EOS ids, decode) as rows finish.
        A continuation ends at its EOS (included) or at its request's cap."""
        import torch

        pending = _by_prompt_length(requests, self.window)
        first = next(pending, None)
        if first is None:
            return  # nothing to answer: the checkpoint is not even loaded
        model, tokenizer, device = self._load(Path(checkpoint_path))
        # The checkpoint's generation_config is read for its EOS ids only: decoding is our own
        # loop over the model's forward, so none of its sampling settings can apply.
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)

        def decode(tokens):
            return tokenizer.decode(tokens, skip_special_tokens=True)

        decoder = ContinuousBatch(model, device, RequestSampler(settings), eos_ids, pad_id)
        try:
            for finished in decoder.run(itertools.chain([first], pending), self.batch_size):
                yield [r for r, _ in finished], [t for _, t in finished], eos_ids, decode
        finally:
            del decoder, model
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
        for batch, continuations, _, _ in self._continuations(checkpoint_path, requests, settings):
            yield {r.prompt_key: tuple(c) for r, c in zip(batch, continuations, strict=True)}

    def close(self) -> None:
        pass


def _by_prompt_length(requests: Iterable[GenerationRequest],
                      window: int) -> Iterator[GenerationRequest]:
    """`requests` in windows of `window`, each sorted by prompt length."""
    iterator = iter(requests)
    while chunk := list(itertools.islice(iterator, window)):
        yield from sorted(chunk, key=lambda r: (len(r.prompt_ids), r.prompt_key))


class ContinuousBatch:
    """Continuous batching over a causal LM's forward and a `DynamicCache`.

    The rows in flight share one left-padded cache: every row's tokens end in the last column,
    so each step feeds one token per row at that row's own position (`position_ids`), with an
    attention mask over its own columns only. A finished row is dropped from the cache (and
    columns no row needs any more are cut); new rows are prefilled on their own, left-padded to
    their longest prompt, and joined by left-padding the narrower cache. Caches other than full
    attention `DynamicLayer`s (sliding windows) are not joined: new rows wait for an empty
    batch there, and caches that cannot drop rows either keep finished rows to the end.
    """

    def __init__(self, model, device, sampler: RequestSampler, eos_ids: set[int], pad_id: int):
        import inspect

        self.model = model
        self.device = device
        self.sampler = sampler
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.prefill_kwargs = ({"logits_to_keep": 1} if "logits_to_keep" in
                               inspect.signature(model.forward).parameters else {})

    def run(self, requests: Iterator[GenerationRequest],
            batch_size: int) -> Iterator[list[tuple[GenerationRequest, list[int]]]]:
        """Yield (request, tokens) pairs as rows finish, at least a quarter batch at a time."""
        import torch

        join_at = max(1, batch_size // 4)
        rows: _Rows | None = None
        finished: list[tuple[GenerationRequest, list[int]]] = []
        more = True
        while rows is not None or more:
            with torch.inference_mode():
                if rows is not None:
                    self._step(rows)
                    finished += rows.take_finished(self.eos_ids)
                    if rows.alive == 0:
                        rows = None
                free = batch_size - (rows.alive if rows is not None else 0)
                if more and (rows is None or (rows.joinable and free >= join_at)):
                    new = list(itertools.islice(requests, free))
                    more = len(new) == free
                    if new:
                        joining = self._prefill(new)
                        finished += joining.take_finished(self.eos_ids)
                        if joining.alive:
                            rows = joining if rows is None else rows.join(joining)
            if finished and (len(finished) >= join_at or rows is None):
                yield finished
                finished = []
        if finished:
            yield finished

    def _prefill(self, requests: list[GenerationRequest]) -> _Rows:
        """The requests' prompts through the model, each row's first token sampled."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what `generate` computes
        cache = DynamicCache(config=self.model.config)
        if {type(layer) for layer in cache.layers} == {DynamicLayer}:
            cache.layers = [roomy_layer_class()() for _ in cache.layers]
        mask = mask.to(self.device)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if bool(mask.all()) else mask,  # `generate` drops an all-ones mask
            position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
            **self.prefill_kwargs).logits[:, -1]
        rows = _Rows(requests, cache, mask)
        rows.append(self.sampler(logits, requests, rows.answers))
        return rows

    def _step(self, rows: _Rows) -> None:
        """One token for every row."""
        import torch

        last = torch.tensor([[a[-1]] for a in rows.answers], device=self.device)
        positions = torch.tensor([[len(r.prompt_ids) + len(a) - 1]
                                  for r, a in zip(rows.requests, rows.answers, strict=True)],
                                 device=self.device)
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.requests), 1))], dim=1)
        logits = self.model(
            input_ids=last, attention_mask=None if bool(rows.mask[:, 0].all()) else rows.mask,
            position_ids=positions, past_key_values=rows.cache, use_cache=True).logits[:, -1]
        rows.append(self.sampler(logits, rows.requests, rows.answers))


class _Rows:
    """Requests decoding together: their answers so far, KV cache and attention mask
    ([rows, columns], right-aligned: a row's prompt and answer end in the last column)."""

    def __init__(self, requests: list[GenerationRequest], cache, mask):
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        self.requests = requests
        self.answers: list[list[int]] = [[] for _ in requests]
        self.done = [False] * len(requests)  # finished, kept only where rows cannot be dropped
        self.cache = cache
        self.mask = mask
        kinds = {type(layer) for layer in cache.layers}
        self.joinable = kinds == {roomy_layer_class()}
        self.droppable = kinds <= {roomy_layer_class(), DynamicLayer, DynamicSlidingWindowLayer}

    @property
    def alive(self) -> int:
        return len(self.requests) - sum(self.done)

    def append(self, tokens: list[int]) -> None:
        for answer, token in zip(self.answers, tokens, strict=True):
            answer.append(token)

    def take_finished(self, eos_ids: set[int]) -> list[tuple[GenerationRequest, list[int]]]:
        """Remove the rows that reached their EOS or cap; return them with their tokens."""
        import torch

        ended = [i for i, (r, a, done) in enumerate(zip(self.requests, self.answers, self.done))
                 if not done and (a[-1] in eos_ids or len(a) >= r.max_new_tokens)]
        if not ended:
            return []
        taken = [(self.requests[i], list(self.answers[i])) for i in ended]
        if not self.droppable:
            for i in ended:
                self.done[i] = True
            return taken
        keep = [i for i in range(len(self.requests)) if i not in set(ended)]
        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask.index_select(0, index)
            self._cut_unused_columns()
        self.requests = [self.requests[i] for i in keep]
        self.answers = [self.answers[i] for i in keep]
        self.done = [False] * len(keep)
        return taken

    def _cut_unused_columns(self) -> None:
        """Drop the leading columns no row attends to (left by a longer row that finished)."""
        if not self.joinable:
            return
        start = int(self.mask.any(dim=0).int().argmax())
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def join(self, other: _Rows) -> _Rows:
        """These rows and `other`'s in one batch, the narrower cache left-padded."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(tensor, dim):
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.requests += other.requests
        self.answers += other.answers
        self.done += other.done
        return self


def _prepack_cpu_linears(model, batch_size: int) -> None:
    """fp32 on CPU: every `nn.Linear` runs through oneDNN with its weight reordered once for
    it, as vLLM's CPU backend does. torch's default fp32 matmul (MKL) ran decode-sized
    products (a batch of rows times a weight) about 1.8x slower on 2 threads, the output layer
    3x. The same products summed in another order: logits agree to ~1e-6, not bit for bit."""
    import torch

    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        return
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) and weight.dtype == torch.float32
                and weight.device.type == "cpu"):
            continue
        packed = mkldnn._reorder_linear_weight(weight.detach(), batch_size)
        module.forward = functools.partial(mkldnn._linear_pointwise, W=packed, B=module.bias,
                                           attr="none", scalars=[], algorithm="")
        if owners[id(weight)] == 1:  # not tied to an embedding: the packed copy replaces it
            weight.data = weight.data.new_empty(0)


CPU_ATTENTION = "tms_cpu_sdpa"


def _share_kv_heads_in_cpu_attention(model) -> None:
    """Run a grouped-query sdpa model's attention as `cpu_sdpa_attention` (same numbers)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    grouped = any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if model.config._attn_implementation != "sdpa" or not grouped:
        return
    AttentionInterface.register(CPU_ATTENTION, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_ATTENTION)


def cpu_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, except that under a padding mask the key/value heads are
    shared inside the kernel (`enable_gqa`: the same numbers on CPU) rather than first copied
    once per query head, a copy of the whole cache per layer and step that cost several times
    the attention itself."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None or query.shape[1] == key.shape[1] or module.training
            or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "s_aux"))
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"),
        enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def roomy_layer_class():
    """`RoomyLayer`, built on first use (transformers is imported late)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A full-attention `DynamicLayer` that writes each step's keys and values into room
        left at the end of its buffers, instead of concatenating (a copy of the whole cache per
        step). `keys`/`values` stay views of the filled part; when something else replaces them
        (rows dropped or joined, columns cut), the next update moves them into new buffers."""

        _layer_type = None  # never registered as transformers' layer for any attention type

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            buffers = getattr(self, "_buffers", None)
            length, new = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
            if (buffers is None or self.keys.data_ptr() != buffers[0].data_ptr()
                    or buffers[0].shape[0] != key_states.shape[0]
                    or length + new > buffers[0].shape[2]):
                room = length + new + max(64, (length + new) // 4)
                shape = (*key_states.shape[:2], room, key_states.shape[3])
                buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                if length:
                    buffers[0][:, :, :length] = self.keys
                    buffers[1][:, :, :length] = self.values
                self._buffers = buffers
            buffers[0][:, :, length:length + new] = key_states
            buffers[1][:, :, length:length + new] = value_states
            self.keys = buffers[0][:, :, :length + new]
            self.values = buffers[1][:, :, :length + new]
            return self.keys, self.values

    return RoomyLayer


class RequestSampler:
    """One token per row from its logits, with our settings only, in vLLM's order: penalties,
    temperature, min_p, top_k, top_p, then the argmax of the scores plus the row's Gumbel noise
    (an exact sample; greedy: penalties, then argmax)."""

    def __init__(self, settings: SamplingSettings):
        from transformers import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        s = settings
        self.penalties = (RequestPenalties(s) if s.repetition_penalty != 1.0
                          or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0 else None)
        self.greedy = s.greedy
        self.warpers = []
        if not s.greedy:
            self.warpers.append(TemperatureLogitsWarper(s.temperature))
            if s.min_p > 0.0:
                self.warpers.append(MinPLogitsWarper(s.min_p))
            if s.top_k > 0:
                self.warpers.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(s.top_p))

    def __call__(self, logits, requests: list[GenerationRequest],
                 answers: list[list[int]]) -> list[int]:
        scores = logits.float()
        if self.penalties is not None:
            scores = self.penalties(scores, [r.prompt_ids for r in requests], answers)
        for warper in self.warpers:
            scores = warper(None, scores)  # the warpers look at the scores only
        if not self.greedy:
            scores = per_request_gumbel_noise(scores, [r.seed for r in requests],
                                              [len(a) for a in answers])
        return scores.argmax(dim=-1).tolist()


def per_request_gumbel_noise(scores, seeds: list[int], steps: list[int]):
    """`scores` plus Gumbel noise, row i's seeded by (seeds[i], steps[i]) only: the argmax is
    then an exact sample of softmax(scores), the same whatever the other rows. Rows are drawn
    on torch's threads (each row's own generator: the same noise on any number of them)."""
    import torch

    noise = torch.empty(scores.shape, dtype=torch.float32)

    inference = torch.is_inference_mode_enabled()

    def draw(rows: range) -> None:
        # Inference mode is per thread: a tensor made under it is written under it.
        with torch.inference_mode(inference):
            for row in rows:
                seed = (seeds[row] + 7919 * steps[row]) % (2**63 - 1)
                noise[row].exponential_(generator=torch.Generator().manual_seed(seed))

    workers = min(torch.get_num_threads(), len(seeds))
    if workers > 1:  # ~2 ms a row on CPU: as much as a 16-row decode step's matmuls per 4 rows
        list(_noise_threads(workers).map(draw, [range(w, len(seeds), workers)
                                                for w in range(workers)]))
    else:
        draw(range(len(seeds)))
    # argmax(logits + Gumbel) with Gumbel = -log(Exp(1)) samples from softmax(logits).
    return scores.float() - noise.log().to(scores.device)


@functools.cache
def _noise_threads(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="tms-gumbel")


class RequestPenalties:
    """vLLM's penalties, row by row: the repetition penalty over the row's prompt and answer
    tokens, presence and frequency over its answer."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings

    def __call__(self, scores, prompts: list[tuple[int, ...]], answers: list[list[int]]):
        import torch

        s = self.settings
        scores = scores.float()
        device = scores.device

        def occurrences(sequences) -> torch.Tensor:
            rows = [row for row, tokens in enumerate(sequences) for _ in tokens]
            tokens = [token for sequence in sequences for token in sequence]
            counts = torch.zeros_like(scores)
            if tokens:
                counts.index_put_((torch.tensor(rows, device=device),
                                   torch.tensor(tokens, device=device)),
                                  torch.ones(len(tokens), device=device), accumulate=True)
            return counts

        counts = occurrences(answers)
        if s.repetition_penalty != 1.0:
            seen = occurrences([(*p, *a) for p, a in zip(prompts, answers, strict=True)]) > 0
            penalised = torch.where(scores > 0, scores / s.repetition_penalty,
                                    scores * s.repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        return scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
