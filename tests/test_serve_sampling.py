"""Sampling controls, n / best_of and logprobs over real HTTP (the default test app), with the official
openai client: each control shows its effect, n seeded choices equal single requests with the
derived seeds, best_of keeps the likeliest, and streamed logprobs equal the non-streamed ones."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import pytest

import models
from deployments.response_models import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse
from tests.conftest import API_KEY

pytestmark = pytest.mark.ray

PROMPT = "def fibonacci(n):\n    "


def _complete(client, **kwargs):
    kwargs.setdefault("model", "tiny")
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("max_tokens", 16)
    return client.completions.create(**kwargs)


@pytest.mark.parametrize("mode", ["ar", "linear_spec"])
def test_top_k_one_equals_greedy(client, mode):
    decoding = {"decoding": {"mode": mode}}
    greedy = _complete(client, temperature=0, extra_body=decoding).choices[0].text
    sampled = _complete(client, temperature=1.0, seed=3, extra_body={**decoding, "top_k": 1}).choices[0].text
    assert sampled == greedy


def test_logit_bias_removes_a_token_and_min_tokens_delays_eos(client, tokenizer, fixture_model):
    plain = _complete(client, temperature=0, logprobs=0)
    pieces = plain.choices[0].logprobs.tokens
    token = tokenizer.encode(pieces[0], add_special_tokens=False)[0]
    banned = _complete(client, temperature=0, logprobs=0, logit_bias={str(token): -100})
    assert pieces[0] not in banned.choices[0].logprobs.tokens

    eos = str(fixture_model.config.eos_token_id)
    forced = _complete(client, temperature=0, logit_bias={eos: 100})
    assert forced.usage.completion_tokens == 1 and forced.choices[0].finish_reason == "stop"
    delayed = _complete(client, temperature=0, logit_bias={eos: 100}, extra_body={"min_tokens": 5})
    assert delayed.usage.completion_tokens == 6 and delayed.choices[0].finish_reason == "stop"


def test_penalties_change_repeats_in_the_expected_direction(client):
    def repeats(**extra) -> int:
        resp = _complete(client, temperature=0, max_tokens=48, logprobs=0, **extra)
        return sum(n - 1 for n in Counter(resp.choices[0].logprobs.tokens).values())

    plain = repeats()
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain
    assert repeats(extra_body={"repetition_penalty": 2.0}) < plain
    assert repeats(frequency_penalty=-1.0) > plain


def test_stop_token_ids_end_the_completion(client, tokenizer):
    plain = _complete(client, temperature=0, logprobs=0)
    stop = tokenizer.encode(plain.choices[0].logprobs.tokens[3], add_special_tokens=False)[0]
    stopped = _complete(client, temperature=0, extra_body={"stop_token_ids": [stop]})
    assert stopped.usage.completion_tokens == 4 and stopped.choices[0].finish_reason == "stop"


def test_controls_in_the_speculative_modes_give_ar_tokens(client):
    extra = {"frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_tokens": 8}
    outs = {
        mode: _complete(client, temperature=0, max_tokens=32, extra_body={**extra, "decoding": {"mode": mode}})
        for mode in ("ar", "linear_spec", "quadratic_spec")
    }
    assert outs["linear_spec"].choices[0].text == outs["ar"].choices[0].text
    assert outs["quadratic_spec"].choices[0].text == outs["ar"].choices[0].text


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_n_seeded_choices_each_equal_a_single_request(client, endpoint):
    # a named mode: under auto each request may get another lossless mode, whose samples follow the
    # same distribution with other tokens for the same seed (the test failed that way once)
    def ask(n: int, seed: int):
        kwargs = {"model": "tiny", "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": n}
        kwargs["extra_body"] = {"decoding": {"mode": "linear_spec"}}
        if endpoint == "chat":
            resp = client.chat.completions.create(messages=[{"role": "user", "content": "Write a loop"}], **kwargs)
            return [c.message.content for c in resp.choices], resp
        resp = client.completions.create(prompt=PROMPT, **kwargs)
        return [c.text for c in resp.choices], resp

    texts, resp = ask(3, 100)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [ask(1, 100 + i)[0][0] for i in range(3)]
    singles = [ask(1, 100 + i)[1] for i in range(3)]
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_best_of_keeps_the_likeliest(client):
    ar = {"decoding": {"mode": "ar"}}  # one mode for all (see above)
    kwargs = {"max_tokens": 10, "temperature": 1.0, "logprobs": 0, "extra_body": ar}
    singles = [_complete(client, seed=7 + i, **kwargs).choices[0] for i in range(4)]
    likeliest = max(singles, key=lambda c: sum(c.logprobs.token_logprobs))
    best = _complete(client, seed=7, best_of=4, **kwargs)
    assert len(best.choices) == 1 and best.choices[0].text == likeliest.text
    two = _complete(client, seed=7, best_of=4, n=2, max_tokens=10, temperature=1.0, extra_body=ar)
    ranked = sorted(singles, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in two.choices] == [c.text for c in ranked[:2]] and two.choices[0].logprobs is None


@pytest.mark.parametrize("mode", ["ar", "linear_spec", "diffusion"])
def test_completion_logprobs_streamed_equal_non_streamed(client, mode):
    kwargs = {"temperature": 0, "logprobs": 2, "extra_body": {"decoding": {"mode": mode}}}
    whole = _complete(client, **kwargs).choices[0].logprobs
    chunks = [c for c in _complete(client, stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
    streamed = {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for chunk in chunks:
        for key in streamed:
            streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed["tokens"] == whole.tokens and streamed["text_offset"] == whole.text_offset
    assert streamed["token_logprobs"] == pytest.approx(whole.token_logprobs)
    assert all(len(top) == 2 for top in whole.top_logprobs)
    assert [sorted(t) for t in streamed["top_logprobs"]] == [sorted(t) for t in whole.top_logprobs]


def test_chat_logprobs_match_completions_and_stream_alike(app, client):
    """Chat logprobs are the decoding's: equal to a completion's of the same prompt ids; streamed alike."""
    messages = [{"role": "user", "content": "print hello"}]
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    resp = client.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = resp.choices[0].logprobs.content
    assert "".join(e.token for e in content).startswith(resp.choices[0].message.content)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(f"{app}/tokenize", json={"model": "tiny", "messages": messages}, headers=headers).json()["tokens"]
    completion = _complete(client, prompt=ids, max_tokens=12, temperature=0, logprobs=3).choices[0].logprobs
    assert [e.token for e in content] == completion.tokens
    assert [e.logprob for e in content] == pytest.approx(completion.token_logprobs, abs=1e-6)
    stream = client.chat.completions.create(stream=True, logprobs=True, top_logprobs=3, **kwargs)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_top_p_and_min_p_keep_only_the_likeliest(client, fixture_model, tokenizer):
    """After this prompt one token holds about 0.69 of the probability: top_p 0.5 keeps only it, and so
    does min_p 0.6 (every other token is below 0.31), while plain sampling (same seeds) picks others too."""
    prompt = "class Foo:\n    def __init__(self"
    first = models.generate(fixture_model, tokenizer.encode(prompt), max_new_tokens=1, logprobs=2).logprobs[0][1]
    assert math.exp(first[0][1]) > 0.5
    likeliest = tokenizer.decode([first[0][0]])

    def samples(**extra) -> list[str]:
        kwargs = {"prompt": prompt, "temperature": 1.0, "max_tokens": 1, "logprobs": 0, **extra}
        return [_complete(client, seed=seed, **kwargs).choices[0].logprobs.tokens[0] for seed in range(16)]

    assert set(samples(top_p=0.5)) == {likeliest}
    assert set(samples(extra_body={"min_p": 0.6})) == {likeliest}
    assert set(samples()) != {likeliest}


def test_responses_are_what_openapi_documents(app):
    """Real bodies and stream chunks (logprobs, n, echo, usage, trace) validate against the response
    models /openapi.json is built from."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    common = {"model": "tiny", "max_tokens": 8, "n": 2, "temperature": 0.5, "seed": 1}
    completion = {**common, "prompt": PROMPT, "logprobs": 2, "echo": True}
    chat = {**common, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1}
    cases = (
        ("/v1/completions", completion, CompletionResponse, CompletionResponse),
        ("/v1/chat/completions", chat, ChatCompletionResponse, ChatCompletionChunk),
    )
    for path, body, whole, chunk in cases:
        r = httpx.post(f"{app}{path}", json=body, headers=headers, timeout=60)
        assert len(whole.model_validate(r.json()).choices) == 2
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}, "decoding": {"trace": True}}
        with httpx.stream("POST", f"{app}{path}", json=stream, headers=headers, timeout=60) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [chunk.model_validate_json(d) for d in data[:-1]]
        assert chunks[-1].usage is not None and any(c.triserve_trace for c in chunks)
