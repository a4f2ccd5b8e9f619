"""Option scoring, embeddings and generation on tiny in-process models, and one real-model check."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bridge.config import ModelRef
from bridge.models.inference import (
    GenerationRequest,
    OptionScoringError,
    _option_scores,
    embed,
    encode_sentences,
    generate,
    iter_generate,
    option_token_ids,
    prompt_logprobs,
    score_options,
    token_logprobs,
)
from bridge.models.loading import load_model
from tiny_models import save_tiny_model

ARCHES = ["llama", "qwen2"]

PROMPTS = [
    "Question: Is the treatment effective? Answer:",
    "Context: Patients with chronic kidney disease were randomised to two groups. Question: Does the drug reduce mortality in patients? Answer:",
    "Which of the following is the most likely diagnosis? Answer:",
]
OPTIONS = [
    [" yes", " no", " maybe"],
    [" yes", " no", " maybe", " bearish sentiment"],
    [" A", " B", " C", " D", " E", " The company reported net income"],
]


@pytest.fixture(scope="module", params=ARCHES)
def lm(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param, layers=2)
    return load_model(ModelRef(path=str(folder)))


def _plain_logprob(lm, prompt: str, option: str) -> tuple[float, int]:
    """Sum the option's token log-probabilities from one unpadded forward pass over prompt + option."""
    prompt_ids = lm.encode(prompt)
    full = lm.encode(prompt + option)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(float(logprobs[k - 1, full[k]]) for k in range(len(prompt_ids), len(full)))
    return total, len(full) - len(prompt_ids)


# --------------------------------------------------------------------------------------------
# Option scoring


@pytest.mark.parametrize("length_norm", ["sum", "mean"])
def test_option_scores_match_plain_forward(lm, length_norm):
    scores = score_options(lm, PROMPTS, OPTIONS, length_norm=length_norm, batch_size=2, progress=False)
    assert len(scores) == len(PROMPTS)
    for prompt, options, result in zip(PROMPTS, OPTIONS, scores, strict=True):
        for option, logprob, count in zip(options, result.logprobs, result.token_counts, strict=True):
            total, tokens = _plain_logprob(lm, prompt, option)
            expected = total / tokens if length_norm == "mean" else total
            assert count == tokens
            assert logprob == pytest.approx(expected, abs=1e-4), (prompt[:20], option)
    assert any(count > 1 for result in scores for count in result.token_counts)


def test_option_scores_distribution(lm):
    [result] = score_options(lm, PROMPTS[:1], OPTIONS[:1], progress=False)
    assert sum(result.probs) == pytest.approx(1.0)
    assert result.predicted == int(np.argmax(result.logprobs))
    assert 0.0 <= result.entropy <= 1.0
    expected = np.exp(result.logprobs) / np.exp(result.logprobs).sum()
    np.testing.assert_allclose(result.probs, expected, rtol=1e-6)


def test_single_token_options_ignore_length_norm(lm):
    options = [[" yes", " no", " A"]]
    mean = score_options(lm, PROMPTS[:1], options, length_norm="mean", progress=False)[0]
    total = score_options(lm, PROMPTS[:1], options, length_norm="sum", progress=False)[0]
    assert mean.token_counts == [1, 1, 1]
    assert mean.logprobs == pytest.approx(total.logprobs)


def test_option_entropy_uniform_and_one_hot(lm):
    [uniform] = score_options(lm, PROMPTS[:1], [[" yes", " yes", " yes"]], progress=False)
    assert uniform.entropy == pytest.approx(1.0)
    assert uniform.probs == pytest.approx([1 / 3] * 3)
    one_hot = _option_scores([0.0, -1e4, -1e4], [1, 1, 1], "mean", "h")
    assert one_hot.entropy == pytest.approx(0.0, abs=1e-9)
    assert one_hot.predicted == 0
    single = _option_scores([-2.0], [1], "mean", "h")
    assert single.entropy == 0.0


def test_option_scores_carry_prompt_hash(lm):
    scores = score_options(lm, [PROMPTS[0], PROMPTS[0], PROMPTS[2]], [OPTIONS[0], OPTIONS[0], OPTIONS[2]], progress=False)
    assert scores[0].prompt_hash == scores[1].prompt_hash
    assert scores[0].prompt_hash != scores[2].prompt_hash


def test_option_prefix_mismatch_raises(lm):
    # "Answer: " ends in a space token that " B" would absorb: the prompt is no prefix.
    with pytest.raises(OptionScoringError, match="not a prefix"):
        option_token_ids(lm, "Question: Is it? Answer: ", ["B"])
    with pytest.raises(OptionScoringError, match="adds no token"):
        option_token_ids(lm, "Question: Is it? Answer:", [""])
    with pytest.raises(OptionScoringError, match="no options"):
        score_options(lm, PROMPTS[:1], [[]], progress=False)


# --------------------------------------------------------------------------------------------
# Token log-probabilities


def test_prompt_logprobs_match_plain_forward(lm):
    results = prompt_logprobs(lm, PROMPTS, top_k=3, batch_size=2)
    assert len(results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = lm.encode(prompt)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        assert result.token_ids == ids
        assert result.logprobs[0] is None
        assert result.top[0] is None
        for k in range(1, len(ids)):
            assert result.logprobs[k] == pytest.approx(float(expected[k - 1, ids[k]]), abs=1e-4)
            best = torch.topk(expected[k - 1], 3)
            assert list(result.top[k]) == best.indices.tolist()
            assert list(result.top[k].values()) == pytest.approx(best.values.tolist(), abs=1e-4)


def test_token_logprobs_without_top_and_bad_rows(lm):
    [single, pair] = token_logprobs(lm, [[5], [5, 6]])
    assert single.logprobs == [None]
    assert pair.top == [None, {}]
    with pytest.raises(ValueError, match="at least one token"):
        token_logprobs(lm, [[]])
    with pytest.raises(ValueError, match="top_k"):
        token_logprobs(lm, [[5]], top_k=-1)


# --------------------------------------------------------------------------------------------
# Embeddings


def test_embed_shape_norm_and_padding(lm):
    vectors = embed(lm, PROMPTS, batch_size=3, progress=False)
    assert vectors.shape == (3, lm.model.config.hidden_size)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    alone = np.stack([embed(lm, [p], batch_size=1, progress=False)[0] for p in PROMPTS])
    np.testing.assert_allclose(vectors, alone, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_embed_is_mean_of_hidden_states(lm):
    ids = torch.tensor([lm.encode(PROMPTS[0])])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    np.testing.assert_allclose(embed(lm, PROMPTS[:1], progress=False)[0], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Generation

REQUESTS = [
    GenerationRequest(id=f"q{i}", prompt=p)
    for i, p in enumerate(
        [
            "Question: Is the treatment effective?",
            "Let's think step by step. First, the results show",
            "Context: Patients with chronic kidney disease were randomised to two groups. Answer:",
            "The correct answer is",
            "Revenue increased from 1,452.4 million to",
        ]
    )
]


def test_batched_generation_equals_one_at_a_time(lm):
    batched = generate(lm, REQUESTS, max_new_tokens=8, batch_size=3, progress=False)
    single = generate(lm, REQUESTS, max_new_tokens=8, batch_size=1, progress=False)
    assert [g.id for g in batched] == [r.id for r in REQUESTS]
    for a, b in zip(batched, single, strict=True):
        assert a.text == b.text, a.id
        assert a.completion_tokens == b.completion_tokens
        assert a.finish_reason == b.finish_reason
        assert a.mean_entropy == pytest.approx(b.mean_entropy, abs=1e-3)


def test_generation_matches_manual_greedy(lm):
    ids = lm.encode(REQUESTS[1].prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    expected = lm.tokenizer.decode(ids[-5:], skip_special_tokens=True)
    [output] = generate(lm, REQUESTS[1:2], max_new_tokens=5, progress=False)
    assert output.text == expected
    assert output.finish_reason == "length"
    assert output.completion_tokens == 5


def test_generation_entropy_of_first_token(lm):
    prompt = REQUESTS[0].prompt
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([lm.encode(prompt)])).logits[0, -1]
    probs = torch.softmax(logits, dim=-1)
    expected = float(-(probs * probs.log()).sum())
    [output] = generate(lm, REQUESTS[:1], max_new_tokens=1, progress=False)
    assert output.mean_entropy == pytest.approx(expected, rel=1e-4)
    assert 0 < output.mean_entropy <= math.log(len(lm.tokenizer))


def test_stop_sequence_cuts_text(lm):
    [free] = generate(lm, REQUESTS[3:4], max_new_tokens=12, progress=False)
    assert len(free.text) >= 4
    stop = free.text[2:4]
    [cut] = generate(lm, REQUESTS[3:4], max_new_tokens=12, stop=[stop], progress=False)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert stop not in cut.text
    assert cut.completion_tokens < free.completion_tokens


def test_stop_sequence_spanning_prompt_end_ignored(lm):
    [free] = generate(lm, REQUESTS[3:4], max_new_tokens=6, progress=False)
    stop = REQUESTS[3].prompt[-2:] + free.text[:1]
    [output] = generate(lm, REQUESTS[3:4], max_new_tokens=6, stop=[stop], progress=False)
    if stop in free.text:
        assert output.text == free.text[: free.text.index(stop)]
    else:
        assert output.text == free.text
        assert output.finish_reason == free.finish_reason


def test_end_of_turn_token_stops(lm):
    [free] = generate(lm, REQUESTS[:1], max_new_tokens=4, progress=False)
    first_token = lm.encode(REQUESTS[0].prompt + free.text)[len(lm.encode(REQUESTS[0].prompt))]
    stopping = dataclasses.replace(lm, eos_token_ids=[*lm.eos_token_ids, first_token])
    [output] = generate(stopping, REQUESTS[:1], max_new_tokens=4, progress=False)
    assert output.finish_reason == "stop"
    assert output.text == ""
    assert output.completion_tokens == 1


def test_seeded_sampling_is_reproducible(lm):
    first = generate(lm, REQUESTS, max_new_tokens=6, temperature=1.0, seed=3, batch_size=2, progress=False)
    again = generate(lm, REQUESTS, max_new_tokens=6, temperature=1.0, seed=3, batch_size=2, progress=False)
    other = generate(lm, REQUESTS, max_new_tokens=6, temperature=1.0, seed=4, batch_size=2, progress=False)
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.text for g in first] != [g.text for g in other]


def test_sampling_leaves_caller_rng_alone(lm):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(lm, REQUESTS[:2], max_new_tokens=3, temperature=1.0, seed=9, progress=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_batches_are_persisted_and_resumed(lm):
    seen: list[list[str]] = []
    full = generate(
        lm,
        REQUESTS,
        max_new_tokens=4,
        temperature=1.0,
        seed=1,
        batch_size=2,
        on_batch=lambda outputs: seen.append([g.id for g in outputs]),
        progress=False,
    )
    assert len(seen) == 3
    assert sorted(i for batch in seen for i in batch) == sorted(r.id for r in REQUESTS)
    # A resumed run skips the first stored batch and samples the rest exactly as before.
    done = set(seen[0])
    batches = list(iter_generate(lm, REQUESTS, max_new_tokens=4, temperature=1.0, seed=1, batch_size=2, skip_ids=done, progress=False))
    assert [[g.id for g in batch] for batch in batches] == seen[1:]
    by_id = {g.id: g for g in full}
    for batch in batches:
        for output in batch:
            assert output == by_id[output.id]


def test_duplicate_ids_rejected(lm):
    with pytest.raises(ValueError, match="unique"):
        generate(lm, [REQUESTS[0], REQUESTS[0]], max_new_tokens=2, progress=False)


# --------------------------------------------------------------------------------------------
# Real models


@pytest.mark.slow
def test_packaged_smollm2_answers():
    lm = load_model(ModelRef(path="packaged:smollm2-135m-instruct"))
    assert (lm.path / "bridge_conversion.json").is_file()
    assert lm.tokenizer.pad_token == "<|endoftext|>"
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in lm.eos_token_ids
    chat = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    [answer] = generate(lm, [GenerationRequest(id="france", prompt=chat)], max_new_tokens=24, progress=False)
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    [scores] = score_options(lm, [chat + "The capital of France is"], [[" London", " Paris", " Berlin"]], progress=False)
    assert scores.predicted == 1
    assert scores.entropy < 0.5


@pytest.mark.slow
def test_packaged_sentence_encoder():
    vectors = encode_sentences(
        ["The drug lowered blood pressure.", "Blood pressure fell with the medication.", "Revenue rose 3 percent."],
        progress=False,
    )
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_score_options_embeddings_match_embed(tiny_model_dir):
    from bridge.config import ModelRef
    from bridge.models import embed, load_model, score_options

    lm = load_model(ModelRef(path=str(tiny_model_dir)))
    prompts = ["Question: Is it? Answer:", "A much longer question about the trial results. Answer:"]
    scores = score_options(lm, prompts, [[" yes", " no"], [" yes", " no", " maybe"]], with_embeddings=True, progress=False)
    direct = embed(lm, prompts, progress=False)
    for score, vector in zip(scores, direct, strict=True):
        assert score.embedding is not None
        assert np.allclose(score.embedding, vector, atol=1e-5)
    plain = score_options(lm, prompts, [[" yes", " no"], [" yes", " no", " maybe"]], progress=False)
    assert all(s.embedding is None for s in plain)
    assert [s.probs for s in plain] == [s.probs for s in scores]
