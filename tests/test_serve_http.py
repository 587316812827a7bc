"""The served app over real HTTP (Ray Serve on 127.0.0.1), driven with the official openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

import models
from models.infill import infill
from tests.conftest import API_KEY

pytestmark = pytest.mark.ray

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


def test_models_listed(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "busy", "calibrated"]


def test_auto_mode_follows_the_replicas_calibration(client, fixture_model, tokenizer):
    # the replica loaded the figures for its device: alone, linear_spec at block 4 is predicted
    # fastest (4 ms a token against AR's 10), so auto picks that mode and that block length
    prompt = "def add(a, b):"
    resp = client.completions.with_raw_response.create(model="calibrated", prompt=prompt, max_tokens=12, temperature=0)
    info = resp.parse().model_extra["triserve"]
    assert (info["mode"], info["block_length"], info["explored"]) == ("linear_spec", 4, False)
    assert resp.headers["x-triserve-block-length"] == "4"
    ar = models.generate(fixture_model, tokenizer.encode(prompt), mode="ar", max_new_tokens=12).tokens
    assert resp.parse().choices[0].text == tokenizer.decode(ar, skip_special_tokens=True)  # still lossless


def test_auto_model_routes_to_the_largest_that_meets_the_tier(client):
    resp = client.completions.create(model="auto", prompt="x = ", max_tokens=4, extra_body={"service_tier": "batch"})
    assert resp.model == "tiny" and resp.model_extra["triserve"]["model"] == "tiny"


def test_overload_answers_429_with_retry_after(app):
    # the first request must still run when the third arrives: 2,000 tokens take the busy model about
    # 2.5 s alone (600, as before, took 0.7 s once its products got cheaper, and no request was refused)
    body = {"model": "busy", "prompt": [1, 5, 9], "max_tokens": 2000, "temperature": 0, "decoding": {"mode": "ar"}}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def main():
        async with httpx.AsyncClient(timeout=300) as http:

            async def late(i):
                await asyncio.sleep(0.4 * i)  # let the server see the queue build up
                return await http.post(f"{app}/v1/completions", json=body, headers=headers)

            return await asyncio.gather(*(late(i) for i in range(5)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["type"] == "rate_limit_error"


def test_a_burst_beyond_the_queue_gets_json_429s(app):
    """Found by bench/reliability.py's overload burst: requests beyond what a model's replicas take
    (``max_running + max_waiting``, at least 16) and queue at the ingress (``max_waiting``) got Serve's
    plain-text 503 instead of the OpenAI-shaped 429."""
    body = {"model": "busy", "prompt": [1, 5, 9], "max_tokens": 8, "temperature": 0, "decoding": {"mode": "ar"}}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def main():
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(
                *(http.post(f"{app}/v1/completions", json=body, headers=headers) for _ in range(40))
            )

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    for rejected in (r for r in responses if r.status_code == 429):
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("mode", MODES)
def test_completion_each_mode_matches_generate(client, fixture_model, tokenizer, mode):
    prompt = "import os\nimport sys\n\ndef main():\n"
    knobs = {"branches": 1} if mode == "quadratic_spec" else {}  # one branch: cycles without a draft too
    raw = client.completions.with_raw_response.create(
        model="tiny",
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={"decoding": {"mode": mode, "block_length": 8, **knobs}},
    )
    resp = raw.parse()
    ids = tokenizer.encode(prompt)
    expected = models.generate(fixture_model, ids, mode=mode, max_new_tokens=24, block_length=8, **knobs)
    assert resp.choices[0].text == tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == len(expected.tokens)
    info = resp.model_extra["triserve"]
    assert info["mode"] == mode and info["model"] == "tiny" and info["nfe"] == expected.nfe
    assert raw.headers["x-triserve-mode"] == mode


def test_completion_token_ids_prompt_and_stop(client, tokenizer):
    ids = tokenizer.encode("class A:\n    def f(self):\n")
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0, stop=["\n"])
    assert "\n" not in resp.choices[0].text and resp.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("mode", MODES)
def test_chat_stream_each_mode(client, mode):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "def add(a, b):"}],
        max_completion_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"decoding": {"mode": mode}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    usage = chunks[-1].usage
    assert (
        usage is not None
        and usage.completion_tokens <= 16
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    assert text


def test_chat_non_stream_and_completion_stream(client):
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "code"}, {"role": "user", "content": "x = 1"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    pieces = list(client.completions.create(model="tiny", prompt="for i in", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)


@pytest.mark.parametrize("tier", ["interactive", "standard", "batch"])
def test_each_tier_is_routed(client, tier):
    resp = client.completions.create(
        model="tiny", prompt="def f():", max_tokens=8, temperature=0, extra_body={"service_tier": tier}
    )
    info = resp.model_extra["triserve"]
    assert info["tier"] == tier and info["mode"] in MODES
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, extra_body={"latency_tier": tier}
    )
    info = chat.model_extra["triserve"]
    assert info["tier"] == tier and info["mode"] in MODES


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(
        model="tiny",
        prompt="import",
        max_tokens=12,
        temperature=1.0,
        seed=42,
        extra_body={"decoding": {"mode": "linear_spec"}},
    )
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_echo_logprobs_for_loglikelihood(client, fixture_model, tokenizer):
    prompt = "def main():\n    return 0\n"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = resp.choices[0].logprobs
    ids = tokenizer.encode(prompt)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    expected = models.score(fixture_model, ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert resp.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_suffix_fills_in_the_middle(client, fixture_model, tokenizer):
    prompt, suffix = "def area(width, height):\n    ", "\n    return result\n"
    resp = client.completions.create(model="tiny", prompt=prompt, suffix=suffix, max_tokens=6, temperature=0)
    expected = infill(fixture_model, tokenizer.encode(prompt), tokenizer.encode(suffix, add_special_tokens=False), 6)
    assert resp.choices[0].text == tokenizer.decode(expected.tokens, skip_special_tokens=True)
    info = resp.model_extra["triserve"]
    assert info["mode"] == "diffusion" and info["nfe"] == expected.nfe  # auto routes a suffix to diffusion


def test_a_list_of_prompts_gets_one_choice_each(client, tokenizer):
    prompts = ["def add(a, b):", "import os\n", "class Point:"]
    kwargs = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    alone = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    batch = client.completions.create(prompt=prompts, **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    ids = client.completions.create(prompt=[tokenizer.encode(p) for p in prompts], **kwargs)
    assert [c.text for c in ids.choices] == [c.text for c in batch.choices]
    chunks = list(
        client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == [c.text for c in batch.choices]
    assert chunks[-1].usage.completion_tokens == batch.usage.completion_tokens


def trace_of(chunks) -> list[dict]:
    return [c.model_extra["triserve_trace"] for c in chunks if not c.choices and c.model_extra.get("triserve_trace")]


@pytest.mark.parametrize("mode", ["diffusion", "linear_spec"])
def test_trace_events_end_with_the_streamed_text(client, mode):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="def add(a, b):\n",
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"decoding": {"mode": mode, "block_length": 8, "trace": True}},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    events = trace_of(chunks)
    assert text and "".join(e["emitted"] for e in events) == text
    kinds = {e["kind"] for e in events}
    if mode == "diffusion":
        assert {"denoise", "commit"} <= kinds
        assert any(None in e["block"] for e in events if e["kind"] == "denoise")  # slots still masked
    else:
        assert {"draft", "verify"} <= kinds and all(isinstance(t, str) for e in events for t in e.get("draft", []))


def test_trace_of_an_infill_shows_every_candidate_and_the_choice(client):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="x = 1\n",
            suffix="\nprint(x, y)\n",
            max_tokens=3,
            temperature=0,
            stream=True,
            extra_body={"decoding": {"trace": True}},
        )
    )
    events = trace_of(chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert {e["candidate"] for e in events if e["kind"] == "denoise"} == {1, 2, 3}
    assert events[-1]["kind"] == "chosen" and events[-1]["text"] == text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "decoding": {"mode": "telepathy"}}, 400, "decoding.mode"),
        ({"model": "tiny", "prompt": "x", "decoding": {"block_length": 1}}, 400, "decoding.block_length"),
        ({"model": "tiny", "prompt": "x", "decoding": {"branches": 0}}, 400, "decoding.branches"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": [99999]}, 400, "prompt"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "service_tier": "turbo"}, 400, None),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": "word " * 600}, 413, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": ["x"] * 257}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["x", ""]}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "suffix": "y", "decoding": {"mode": "ar"}}, 400, "suffix"),
        ({"model": "tiny", "prompt": "x", "suffix": "y = 1\n" * 50, "max_tokens": 500}, 400, "suffix"),
        ({"model": "tiny", "prompt": "x", "decoding": {"trace": True}}, 400, "decoding.trace"),
        ({"model": "tiny", "prompt": "x", "decoding": {"revise": {"threshold": 0.5, "max_passes": -1}}}, 400, None),
        ({"model": "tiny", "prompt": "x", "decoding": {"revise": {"threshold": 1.5}}}, 400, None),
        ({"model": "tiny", "prompt": "x", "decoding": {"mode": "ar", "revise": {"threshold": 0.5}}}, 400, "decoding"),
        ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"model": "tiny", "prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"a": 10}}, 400, "logit_bias"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"99999": 10}}, 400, "logit_bias"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"model": "tiny", "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k"),
        ({"model": "tiny", "prompt": "x", "min_p": 1.5}, 400, "min_p"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "n": 3, "best_of": 2}, 400, None),
        ({"model": "tiny", "prompt": "x", "best_of": 2, "stream": True}, 400, None),
        ({"model": "tiny", "prompt": ["x"] * 100, "n": 3}, 400, None),
        ({"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ],
)
def test_bad_input_gets_openai_error(app, body, status, param):
    r = httpx.post(f"{app}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and ("param" in err and (param is None or err["param"] == param))


def test_fields_that_ask_for_nothing_are_accepted(client):
    # what SDKs and tools send by default (and an unknown field, ignored and logged) is no reason to refuse
    resp = client.completions.create(
        model="tiny",
        prompt="x = ",
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        extra_body={"response_format": {"type": "text"}, "tools": [], "some_future_field": 1},
    )
    assert resp.choices[0].text is not None


def test_auth_required(app):
    assert httpx.get(f"{app}/v1/models", timeout=30).status_code == 401
    r = httpx.get(f"{app}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        f"{app}/v1/chat/completions",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400


def test_server_keeps_serving_after_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body={"decoding": {"mode": "bogus"}})
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0).choices[0].text is not None


def test_sixteen_concurrent_streams_mixed_modes_equal_alone(app, fixture_model, tokenizer):
    prompts = [f"def func_{i}(x):\n    " for i in range(16)]

    async def one(aclient, i):
        mode = MODES[i % 4]
        stream = await aclient.completions.create(
            model="tiny",
            prompt=prompts[i],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"decoding": {"mode": mode, "block_length": 8}},
        )
        return mode, "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{app}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    results = asyncio.run(main())
    for i, (mode, text) in enumerate(results):
        alone = models.generate(
            fixture_model, tokenizer.encode(prompts[i]), mode=mode, max_new_tokens=12, block_length=8
        )
        assert text == tokenizer.decode(alone.tokens, skip_special_tokens=True), (i, mode)


def test_shared_prefix_is_served_from_the_prefix_cache(app, client, fixture_model, tokenizer):
    from ray import serve

    handle = serve.get_deployment_handle("model-tiny", app_name="triserve")
    before = handle.stats.remote().result()
    assert before["max_step_tokens"] == 512  # the app config's step budget reaches the engine
    shared = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(6))
    prompts = [shared + f"def main_{i}():\n    " for i in range(2)]
    texts = [
        client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]
    after = handle.stats.remote().result()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 3 * 16  # the second prompt's shared pages
    for prompt, text in zip(prompts, texts):
        alone = models.generate(fixture_model, tokenizer.encode(prompt), max_new_tokens=6)
        assert text == tokenizer.decode(alone.tokens, skip_special_tokens=True)


def test_disconnect_mid_stream_frees_pages(app):
    from ray import serve

    # the small random model never emits EOS and 1800 tokens outlast the check by far
    handle = serve.get_deployment_handle("model-busy", app_name="triserve")
    baseline = handle.stats.remote().result()["used_pages"]
    body = {
        "model": "busy",
        "prompt": [1, 5, 9],
        "max_tokens": 1800,
        "temperature": 0,
        "stream": True,
        "decoding": {"mode": "ar"},
    }
    with httpx.stream(
        "POST", f"{app}/v1/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        # keep a reference to the line iterator: dropping it (a `break` out of a for loop) closes the
        # connection at once, and the server would cancel before the check below
        lines = r.iter_lines()
        seen = 0
        while seen < 2:
            line = next(lines)
            if line.startswith("data: {"):
                seen += 1
                assert "error" not in json.loads(line[6:])
        assert handle.stats.remote().result()["used_pages"] > baseline
    deadline = time.time() + 30
    while time.time() < deadline and handle.stats.remote().result()["used_pages"] != baseline:
        time.sleep(0.2)
    assert handle.stats.remote().result()["used_pages"] == baseline
