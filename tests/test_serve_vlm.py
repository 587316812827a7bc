"""The bundled tiny VLM served from the default config over real HTTP (Ray Serve on 127.0.0.1),
driven with the official openai client: base64 PNGs in chat messages, every mode, accuracy on
fresh pictures, and a 400 for every class of bad image input while the server keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import random

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import run_app
from vision.shapes import draw

pytestmark = pytest.mark.ray

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
MAX_BYTES = 300_000  # this app's image limit, so an oversized image is cheap to send


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png_url(image: Image.Image, fmt: str = "PNG", media: str = "image/png") -> str:
    return data_url(png_bytes(image, fmt), media)


def ask(url: str, question: str = "What is in this picture?") -> list[dict]:
    parts = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vlm_base(serve_port):
    """The default config's ``tiny-vlm`` and ``tiny`` under their own app name and route prefix."""
    from ray import serve

    from deployments.config import DEFAULT_CONFIG, load_config
    from deployments.ingress import build_app

    config = load_config(DEFAULT_CONFIG)
    specs = [dataclasses.replace(config.model(name), num_cpus=0.1) for name in ("tiny-vlm", "tiny")]
    config = dataclasses.replace(
        config,
        models=specs,
        api_key_env=None,
        ingress_num_cpus=0.1,
        images=dataclasses.replace(config.images, max_bytes=MAX_BYTES),
    )
    base = run_app(build_app(config), "triserve-vlm", "/vlm", serve_port, timeout_s=120)
    yield base
    serve.delete("triserve-vlm")


@pytest.fixture(scope="module")
def client(vlm_base):
    return openai.OpenAI(base_url=f"{vlm_base}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages, mode="ar", model="tiny-vlm", **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"decoding": {"mode": mode}},
        **kwargs,
    )


def test_lists_both_models(client):
    assert {m.id for m in client.models.list().data} == {"tiny-vlm", "tiny"}


def test_every_mode_answers_and_spec_equals_ar(client):
    picture = draw(random.Random(7))
    answers = {}
    for mode in MODES:
        reply = chat(client, ask(png_url(picture.image)), mode=mode)
        assert reply.model_extra["triserve"]["mode"] == mode
        answers[mode] = reply.choices[0].message.content
        assert answers[mode].strip(), mode
        assert reply.usage.prompt_tokens > 9  # the image's placeholder rows are part of the prompt
    assert answers["linear_spec"] == answers["ar"] == answers["quadratic_spec"]  # lossless at temperature 0
    assert answers["ar"].strip() == picture.caption


@pytest.mark.parametrize("mode", MODES)
def test_names_shape_and_colour_of_fresh_pictures(client, mode):
    rng = random.Random(20_250_101)  # pictures the model never saw (training draws from other seeds)
    pictures = [draw(rng) for _ in range(50)]
    right = 0
    for picture in pictures:
        words = chat(client, ask(png_url(picture.image)), mode=mode).choices[0].message.content.split()
        right += picture.colour in words and picture.shape in words
    print(f"{mode}: {right}/50 pictures named right")
    assert right >= 45, f"{mode}: {right}/50 pictures named right"


def test_auto_routes_images_to_the_vlm_and_text_only_model_rejects_them(client):
    url = png_url(draw(random.Random(3)).image)
    reply = client.chat.completions.create(model="auto", messages=ask(url), max_tokens=8, temperature=0)
    assert reply.model == "tiny-vlm"
    stream = client.chat.completions.create(model="auto", messages=ask(url), max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=ask(url), max_tokens=8)
    assert "does not accept images" in info.value.body["message"]


def bad_inputs() -> dict[str, tuple[list[dict], str]]:
    good = draw(random.Random(1)).image
    noise = Image.effect_noise((400, 400), 64).convert("RGB")  # about 500 kB as PNG: over this app's limit
    bomb = Image.new("1", (8000, 8000))  # 64 M pixels in a few kB
    return {
        "not base64": (ask("data:image/png;base64,@@@"), "valid base64"),
        "not an image": (ask(data_url(b"hello")), "could not decode"),
        "truncated": (ask(data_url(png_bytes(good)[:100])), "could not decode"),  # of about 200 bytes
        "unsupported type": (ask(png_url(good, "TIFF", "image/tiff")), "unsupported image type"),
        "too many bytes": (ask(png_url(noise)), "larger than the limit"),
        "decompression bomb": (ask(png_url(bomb)), "pixels"),
        "remote URL disabled": (ask("http://127.0.0.1:9/picture.png"), "disabled"),
        "other scheme": (ask("file:///etc/passwd"), "data: URL"),
        "no url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "non-empty string"),
        "too many images": (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(good)}}] * 9}],
            "at most 8 images",
        ),
        "placeholder tokens in text": (
            [{"role": "user", "content": [{"type": "text", "text": "[IMG][IMG_END] what?"}]}],
            "placeholder",
        ),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_image_inputs_answer_400_and_serving_goes_on(client, vlm_base, case):
    messages, message = bad_inputs()[case]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error", error
    assert message in error["message"], error
    # the same error body over plain HTTP, then a good request is still served
    raw = httpx.post(f"{vlm_base}/v1/chat/completions", json={"model": "tiny-vlm", "messages": messages}, timeout=60)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    picture = draw(random.Random(hash(case) % 1000))
    assert chat(client, ask(png_url(picture.image))).choices[0].message.content.strip()
