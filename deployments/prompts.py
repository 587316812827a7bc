"""Prompts of the OpenAI requests as token ids: completions prompts, chat messages through the
model's template, and images (loaded, preprocessed, and placed in the text as their placeholders)."""

from __future__ import annotations

from typing import Any

import numpy as np

from deployments.protocol import APIError, ChatRequest, TokenizeRequest
from deployments.served import ServedModel
from models.data import CHAT_TEMPLATE
from vision.loading import ImageError, ImageLimits, load_image
from vision.preprocess import ImageLayout, placeholder_text, preprocess


def encode_prompt(model: ServedModel, prompt) -> list[int]:
    """A completions prompt (text or token ids) as ids; bad ids are a 400."""
    if isinstance(prompt, str):
        ids = model.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        vocab = model.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
    check_placeholders(model, ids, 0, "prompt")  # completions carry no images
    return ids


def chat_prompt(
    model: ServedModel, req: ChatRequest | TokenizeRequest, limits: ImageLimits, add_generation_prompt: bool = True
) -> tuple[list[int], list[np.ndarray]]:
    """Prompt ids and the preprocessed images; each image sits in the text as its placeholder layout."""
    messages, images, expected = [], [], 0
    for i, msg in enumerate(req.messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    pixels, layout = image_part(
                        model, part, len(images), f"messages[{i}].content[{j}].image_url", limits
                    )
                    images.append(pixels)
                    tokens = model.vision.image_tokens(model.tokenizer)
                    texts.append(placeholder_text(layout, tokens, model.tokenizer))
                    expected += layout.num_image_tokens
                else:
                    raise APIError(400, f"unsupported content part type {kind!r}", param=f"messages[{i}].content")
            content = "".join(texts)
        messages.append({"role": msg.role, "content": content or ""})
    tok = model.tokenizer
    template = getattr(tok, "chat_template", None) or CHAT_TEMPLATE  # checkpoints without one
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    try:
        text = tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template may refuse a conversation (roles out of order, ...): Jinja's own errors
        raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    check_placeholders(model, ids, expected, "messages")
    return ids, images


def image_part(
    model: ServedModel, part: dict[str, Any], index: int, param: str, limits: ImageLimits
) -> tuple[np.ndarray, ImageLayout]:
    """One image_url part -> (normalised pixels, its placeholder layout); every bad input is a 400."""
    if model.vision is None:
        raise APIError(400, f"model '{model.spec.name}' does not accept images", param=param)
    if index >= limits.max_images:
        raise APIError(400, f"at most {limits.max_images} images per request", param=param)
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    try:
        image = load_image(url, limits)
    except ImageError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_image") from None
    return preprocess(image, model.vision.vision, model.vision.spatial_merge_size)


def check_placeholders(model: ServedModel, ids: list[int], expected: int, param: str) -> None:
    """A VLM prompt holds image placeholders only where images were given: text that spells them
    would leave placeholders without embeddings."""
    if model.vision is not None and ids.count(model.vision.image_token_id) != expected:
        raise APIError(400, "the text must not contain image placeholder tokens", param=param)
