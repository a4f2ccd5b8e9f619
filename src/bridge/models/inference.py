"""Run a loaded model: option scoring, embeddings and batched generation.

Every function takes rendered prompt strings (chat templates are applied by the caller) and
tokenises them with :meth:`LocalModel.encode`, so a prompt that starts with the template's BOS
token gets no second one. Batches are left-padded and carry explicit position ids, so a padded
row computes the same values as the row alone (up to floating-point rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm.auto import tqdm

from bridge.errors import BridgeError
from bridge.models.loading import LocalModel, resolve_model

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

LengthNorm = Literal["mean", "sum"]
FinishReason = Literal["stop", "length"]


class OptionScoringError(BridgeError):
    """The options of a prompt cannot be scored as continuations of it."""


def prompt_hash(text: str) -> str:
    """Return a short stable hash of a prompt, stored with outputs to detect changed prompts."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return input ids, attention mask and position ids for left-padded ``rows``."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split indices into batches of similar length: longest first, ties in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _progress(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Option scoring


@dataclass(frozen=True)
class OptionScores:
    """Scores of a prompt's options, in the order the options were given.

    ``logprobs`` are the options' continuation log-probabilities after length normalisation,
    and ``probs`` is their softmax over the options. ``entropy`` is the entropy of ``probs``
    divided by log(number of options), so it is 0 for a one-hot and 1 for a uniform distribution.
    """

    logprobs: list[float]
    probs: list[float]
    predicted: int
    entropy: float
    prompt_hash: str
    token_counts: list[int]
    #: L2-normalised mean of the prompt's last hidden state, when requested (same forward pass).
    embedding: np.ndarray | None = None


def option_token_ids(lm: LocalModel, prompt: str, options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenise ``prompt`` and each ``prompt + option``, and return the prompt ids and each option's ids.

    Each option is tokenised together with the prompt (BPE merges can cross the boundary) and
    split after the prompt's last token. Raises :class:`OptionScoringError` when the prompt's
    tokens are not a prefix of the joined tokens, or an option adds no token.
    """
    prompt_ids = lm.encode(prompt)
    option_ids: list[list[int]] = []
    for option in options:
        full = lm.encode(prompt + option)
        if full[: len(prompt_ids)] != prompt_ids:
            raise OptionScoringError(
                f"option {option!r} changes the tokens of the prompt ending {prompt[-40:]!r}: the prompt's "
                "tokens are not a prefix of prompt + option",
                hint="end the prompt where a token boundary is certain (for example 'Answer:') and start each option with its leading space (' B')",
            )
        tail = full[len(prompt_ids) :]
        if not tail:
            raise OptionScoringError(
                f"option {option!r} adds no token to the prompt ending {prompt[-40:]!r}",
                hint="options must be non-empty text such as ' yes' or ' B'",
            )
        option_ids.append(tail)
    return prompt_ids, option_ids


def score_options(
    lm: LocalModel,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    length_norm: LengthNorm = "mean",
    batch_size: int = 8,
    progress: bool = True,
    with_embeddings: bool = False,
) -> list[OptionScores]:
    """Score each prompt's options by the log-probability of the option text following the prompt.

    With ``with_embeddings`` each result also carries the prompt's embedding as :func:`embed`
    computes it, taken from the same forward pass, so scoring and embedding cost one pass.

    Each prompt is encoded once: its key-value cache is shared by all its options, and only the
    tokens after an option's first one need a second, batched forward pass. ``length_norm``
    "mean" divides a multi-token option's log-probability by its token count; "sum" keeps the
    total. Single-token options are unaffected. Results are in input order.
    """
    import torch

    if len(prompts) != len(continuations):
        raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} option lists")
    if length_norm not in ("mean", "sum"):
        raise ValueError(f"length_norm must be 'mean' or 'sum', not {length_norm!r}")
    encoded = []
    for prompt, options in zip(prompts, continuations, strict=True):
        if not options:
            raise OptionScoringError(
                f"no options given for the prompt ending {prompt[-40:]!r}", hint="pass at least one option per prompt"
            )
        encoded.append(option_token_ids(lm, prompt, options))

    results: list[OptionScores | None] = [None] * len(prompts)
    batches = _length_sorted_batches([len(p) for p, _ in encoded], batch_size)
    bar = _progress(len(prompts), "scoring options", "prompt", progress)
    started, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in batches:
            sums, pooled = _score_batch(lm, [encoded[i] for i in batch], with_embeddings)
            for row, (i, option_sums) in enumerate(zip(batch, sums, strict=True)):
                counts = [len(ids) for ids in encoded[i][1]]
                result = _option_scores(option_sums, counts, length_norm, prompt_hash(prompts[i]))
                if pooled is not None:
                    result = dataclasses.replace(result, embedding=pooled[row])
                results[i] = result
                tokens += len(encoded[i][0]) + sum(counts)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    return [r for r in results if r is not None]


def _score_batch(
    lm: LocalModel, items: list[tuple[list[int], list[list[int]]]], with_embeddings: bool = False
) -> tuple[list[list[float]], np.ndarray | None]:
    """Return the summed continuation log-probability of every option of every prompt in ``items``.

    With ``with_embeddings`` also return the prompts' pooled, L2-normalised last hidden states.
    """
    import torch

    device = lm.device
    prompt_rows = [prompt_ids for prompt_ids, _ in items]
    input_ids, mask, positions = _pad_left(prompt_rows, lm.tokenizer.pad_token_id)
    needs_second_pass = any(len(ids) > 1 for _, options in items for ids in options)
    out = lm.model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=needs_second_pass,
        logits_to_keep=1,
        output_hidden_states=with_embeddings,
    )
    pooled = None
    if with_embeddings:
        import numpy as np

        hidden = out.hidden_states[-1].float()
        weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
        mean = (hidden * weights).sum(1) / weights.sum(1)
        pooled = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy().astype(np.float32)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    sums = [[float(first[b, ids[0]]) for ids in options] for b, (_, options) in enumerate(items)]
    if not needs_second_pass:
        return sums, pooled

    # Second pass: the remaining tokens of multi-token options, one row per option, each row
    # reading the cache of its own prompt.
    rows = [(b, j, ids) for b, (_, options) in enumerate(items) for j, ids in enumerate(options) if len(ids) > 1]
    source = torch.tensor([b for b, _, _ in rows], dtype=torch.long)
    width = max(len(ids) - 1 for _, _, ids in rows)
    option_inputs = torch.full((len(rows), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    option_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (_, _, ids) in enumerate(rows):
        option_inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
        option_mask[r, : len(ids) - 1] = 1
    prompt_lengths = mask.sum(-1)[source]
    option_positions = prompt_lengths[:, None] + torch.arange(width)[None, :]
    cache = out.cache
    cache.batch_select_indices(source.to(device))
    second = lm.model(
        input_ids=option_inputs.to(device),
        attention_mask=torch.cat([mask[source], option_mask], dim=-1).to(device),
        position_ids=option_positions.to(device),
        cache=cache,
        use_cache=True,
    )
    logprobs = torch.log_softmax(second.logits.float(), dim=-1).cpu()
    for r, (b, j, ids) in enumerate(rows):
        targets = torch.tensor(ids[1:], dtype=torch.long)
        picked = logprobs[r, torch.arange(len(ids) - 1), targets]
        sums[b][j] += float(picked.sum())
    return sums, pooled


def _option_scores(sums: list[float], counts: list[int], length_norm: LengthNorm, digest: str) -> OptionScores:
    if length_norm == "mean":
        logprobs = [s / n for s, n in zip(sums, counts, strict=True)]
    else:
        logprobs = list(sums)
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    probs = [w / total for w in weights]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    normalised = entropy / math.log(len(probs)) if len(probs) > 1 else 0.0
    return OptionScores(
        logprobs=logprobs,
        probs=probs,
        predicted=max(range(len(logprobs)), key=logprobs.__getitem__),
        entropy=min(max(normalised, 0.0), 1.0),
        prompt_hash=digest,
        token_counts=list(counts),
    )


# --------------------------------------------------------------------------------------------
# Token log-probabilities


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of every token of a sequence given the tokens before it.

    ``logprobs[0]`` and ``top[0]`` are None, because the first token has no context. ``top[k]``
    maps the ids of the ``top_k`` most likely tokens at position k to their log-probabilities
    (empty when ``top_k`` is 0).
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[dict[int, float] | None]


def token_logprobs(
    lm: LocalModel, rows: Sequence[Sequence[int]], *, top_k: int = 0, batch_size: int = 8
) -> list[TokenLogprobs]:
    """Return the log-probability of each token of each row of token ids, in input order.

    Each batch of left-padded rows takes one teacher-forced forward pass. An OpenAI-compatible
    server returns these values as the prompt log-probabilities of ``echo=true``.
    """
    import torch

    if top_k < 0:
        raise ValueError(f"top_k must be 0 or more, not {top_k}")
    if any(len(row) == 0 for row in rows):
        raise ValueError("every row needs at least one token")
    results: list[TokenLogprobs | None] = [None] * len(rows)
    with torch.inference_mode():
        for batch in _length_sorted_batches([len(row) for row in rows], batch_size):
            input_ids, mask, positions = _pad_left([rows[i] for i in batch], lm.tokenizer.pad_token_id)
            logits = lm.model(
                input_ids=input_ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=positions.to(lm.device),
                use_cache=False,
            ).logits
            width = input_ids.shape[1]
            for b, i in enumerate(batch):
                ids = list(rows[i])
                start = width - len(ids)
                # Position k's distribution is read from the logits after token k - 1.
                logprobs = torch.log_softmax(logits[b, start : width - 1].float(), dim=-1).cpu()
                targets = torch.tensor(ids[1:], dtype=torch.long)
                picked = logprobs[torch.arange(len(ids) - 1), targets].tolist()
                top: list[dict[int, float] | None] = [None]
                if top_k:
                    values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
                    top += [dict(zip(ix.tolist(), vs.tolist(), strict=True)) for ix, vs in zip(indices, values, strict=True)]
                else:
                    top += [{} for _ in picked]
                results[i] = TokenLogprobs(token_ids=ids, logprobs=[None, *picked], top=top)
    return [r for r in results if r is not None]


def prompt_logprobs(lm: LocalModel, texts: Sequence[str], *, top_k: int = 0, batch_size: int = 8) -> list[TokenLogprobs]:
    """Tokenise each text with :meth:`LocalModel.encode` and return its :func:`token_logprobs`."""
    return token_logprobs(lm, [lm.encode(text) for text in texts], top_k=top_k, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# Embeddings


def embed(lm: LocalModel, prompts: Sequence[str], *, batch_size: int = 8, progress: bool = True) -> np.ndarray:
    """Return the L2-normalised mean of the last hidden state over each prompt's tokens, shape (n, hidden)."""
    import numpy as np
    import torch

    encoded = [lm.encode(p) for p in prompts]
    if not encoded:
        return np.zeros((0, lm.model.config.hidden_size), dtype=np.float32)
    vectors: list[torch.Tensor | None] = [None] * len(encoded)
    decoder = lm.model.get_decoder()
    bar = _progress(len(encoded), "embedding", "prompt", progress)
    started, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
            input_ids, mask, positions = _pad_left([encoded[i] for i in batch], lm.tokenizer.pad_token_id)
            hidden = decoder(
                input_ids=input_ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=positions.to(lm.device),
                use_cache=False,
            ).last_hidden_state.float()
            weights = mask.to(lm.device, torch.float32).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
            for row, i in enumerate(batch):
                vectors[i] = pooled[row]
            tokens += int(mask.sum())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    return torch.stack([v for v in vectors if v is not None]).numpy().astype(np.float32)


@functools.lru_cache(maxsize=2)
def _sentence_encoder(path: Path, device: str | None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)


def encode_sentences(
    texts: Sequence[str],
    encoder_ref: str = "packaged:all-minilm-l6-v2",
    *,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Return L2-normalised sentence-encoder embeddings of ``texts``, shape (n, dimension)."""
    import numpy as np

    from bridge.errors import ModelLoadError

    path = resolve_model(encoder_ref)
    try:
        encoder = _sentence_encoder(path, device)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load sentence encoder {encoder_ref!r} from {path}: {type(exc).__name__}: {exc}",
            hint="use packaged:all-minilm-l6-v2 or a folder written by SentenceTransformer.save",
        ) from None
    vectors = encoder.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.asarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete; ``id`` joins the output back to its input."""

    id: str
    prompt: str


@dataclass(frozen=True)
class Generation:
    """One completion.

    ``text`` excludes the end-of-turn token and any stop sequence. ``finish_reason`` is "stop"
    when an end-of-sequence token or a stop sequence ended it and "length" when it reached
    ``max_new_tokens``. ``mean_entropy`` is the mean entropy (nats) of the model's next-token
    distribution at the generated positions, before temperature or top-p.
    """

    id: str
    prompt_hash: str
    text: str
    completion_tokens: int
    finish_reason: FinishReason
    mean_entropy: float


def plan_generation_batches(lm: LocalModel, requests: Sequence[GenerationRequest], batch_size: int) -> list[list[int]]:
    """Return request indices grouped into batches by prompt length (longest first).

    The batches depend only on the list, so a resumed run that passes the same list forms the
    same batches and, with the same seed, samples the same completions.
    """
    return _length_sorted_batches([len(lm.encode(r.prompt)) for r in requests], batch_size)


def iter_generate(
    lm: LocalModel,
    requests: Sequence[GenerationRequest],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    skip_ids: Collection[str] = (),
    progress: bool = True,
) -> Iterator[list[Generation]]:
    """Generate completions batch by batch, yielding each finished batch's outputs.

    ``temperature`` 0 is greedy decoding. Above 0, tokens are sampled from the full distribution
    (no top-k) with nucleus mass ``top_p``, and each batch's seed derives from ``seed`` and the
    batch's position.
    Requests whose id is in ``skip_ids`` (outputs a caller has already stored) are not yielded,
    and a batch whose every request is skipped is not run.
    """
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"generation request ids must be unique; repeated: {duplicates}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")

    encoded = [lm.encode(r.prompt) for r in requests]
    batches = _length_sorted_batches([len(e) for e in encoded], batch_size)
    skipped = set(skip_ids)
    bar = _progress(sum(1 for i in ids if i not in skipped), "generating", "prompt", progress)
    started, generated = time.perf_counter(), 0
    for number, batch in enumerate(batches):
        pending = [i for i in batch if ids[i] not in skipped]
        if not pending:
            continue
        rows = _generate_batch(
            lm,
            [encoded[i] for i in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=_batch_seed(seed, number),
            stop=stop,
        )
        outputs = []
        for i, (text, count, reason, entropy) in zip(batch, rows, strict=True):
            generated += count
            if ids[i] in skipped:
                continue
            outputs.append(
                Generation(
                    id=ids[i],
                    prompt_hash=prompt_hash(requests[i].prompt),
                    text=text,
                    completion_tokens=count,
                    finish_reason=reason,
                    mean_entropy=entropy,
                )
            )
        bar.update(len(outputs))
        bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - started, 1e-9):.1f}")
        yield outputs
    bar.close()


def generate(
    lm: LocalModel,
    requests: Sequence[GenerationRequest],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    skip_ids: Collection[str] = (),
    on_batch: Callable[[list[Generation]], None] | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Generate a completion for each request, in length-sorted batches, and return them in input order.

    ``on_batch`` is called with each finished batch's outputs, so a caller can store them before
    the next batch starts; see :func:`iter_generate` for the other arguments.
    """
    by_id: dict[str, Generation] = {}
    for outputs in iter_generate(
        lm,
        requests,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        batch_size=batch_size,
        skip_ids=skip_ids,
        progress=progress,
    ):
        if on_batch is not None:
            on_batch(outputs)
        by_id.update((g.id, g) for g in outputs)
    return [by_id[r.id] for r in requests if r.id in by_id]


def _batch_seed(seed: int, batch_number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _generate_batch(
    lm: LocalModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop: Sequence[str],
) -> list[tuple[str, int, FinishReason, float]]:
    """Generate for one batch and return (text, completion tokens, finish reason, mean entropy) per row."""
    import torch

    input_ids, mask, _ = _pad_left(prompts, lm.tokenizer.pad_token_id)
    options: dict[str, object] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": lm.eos_token_ids,
        "pad_token_id": lm.tokenizer.pad_token_id,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        from transformers import StoppingCriteriaList

        criterion = _stop_sequence_criterion(lm, input_ids.shape[1], stop)
        options["stopping_criteria"] = StoppingCriteriaList([criterion])
    # The batch's seed is set inside a forked random state, so callers' random streams are untouched.
    cuda_devices = [lm.device.index or 0] if lm.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        out = lm.model.generate(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), **options)
        sequences = out.sequences[:, input_ids.shape[1] :].cpu()
        entropies = torch.stack([_entropy(step.float()) for step in out.logits], dim=1).cpu()
    return [
        _finish_row(lm, sequences[row].tolist(), entropies[row], stop)
        for row in range(sequences.shape[0])
    ]


def _stop_sequence_criterion(lm: LocalModel, prompt_width: int, stop: Sequence[str]):
    """Return a stopping criterion that ends a row once its completion text contains a stop sequence.

    transformers' own ``stop_strings`` also matches text that starts inside the prompt, so a
    stop sequence spanning the prompt's end would stop a row whose completion lacks it.
    """
    import torch
    from transformers import StoppingCriteria

    sequences = [s for s in stop if s]
    # Every token but a skipped special token decodes to at least one character, so a window
    # this many tokens long covers any stop sequence that the newest token completes.
    window = max(len(s) for s in sequences) + 4

    class StopOnCompletionText(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            completion = input_ids[:, prompt_width:]
            tail = completion[:, -window:].tolist()
            texts = lm.tokenizer.batch_decode(tail, skip_special_tokens=True)
            done = [any(s in text for s in sequences) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnCompletionText()


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def _finish_row(
    lm: LocalModel, tokens: list[int], entropies: torch.Tensor, stop: Sequence[str]
) -> tuple[str, int, FinishReason, float]:
    """Cut a generated row at its end-of-sequence token or first stop sequence."""
    tokenizer = lm.tokenizer
    eos_positions = [k for k, t in enumerate(tokens) if t in lm.eos_token_ids]
    if eos_positions:
        end = eos_positions[0]
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        count, reason = end + 1, "stop"
    else:
        # A row that ended on a stop sequence is padded to the batch's length; the stop search
        # below finds its real end. Any other row without eos ran to max_new_tokens.
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        count, reason = len(tokens), "length"
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:
        position, sequence = min(hits)
        text = text[:position]
        reason = "stop"
        # The completion ends at the first token whose decoded prefix contains the stop sequence.
        count = next(
            (k for k in range(1, count + 1) if sequence in tokenizer.decode(tokens[:k], skip_special_tokens=True)),
            count,
        )
    mean_entropy = float(entropies[:count].mean()) if count else 0.0
    return text, count, reason, mean_entropy
