"""The VLM core on tiny random checkpoints written in the official folder layout by the tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import models
from models.config import ConfigError
from models.engine import Engine, KVCacheManager
from models.loading import CheckpointError
from models.segments import PromptEmbeds
from models.vlm import VisionLanguageModel, VLMConfig, load_vlm, read_config, save_vlm
from tests.conftest import tiny_config
from vision.preprocess import ImageTokens, layout_for, placeholder_ids, preprocess

IMG, BREAK, END = 4, 5, 6
TOKENS = ImageTokens(IMG, BREAK, END)


def vlm_raw(**overrides) -> dict:
    text = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).to_dict()
    text.pop("mask_token_id")  # carried at the top level, as a VLM file may do
    raw = {
        "model_type": "nemotron_labs_diffusion_vlm",
        "architectures": ["NemotronLabsDiffusionVLModel"],
        "mask_token_id": 3,
        "text_config": text,
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": 8,
            "patch_size": 14,
            "image_size": 112,
            "hidden_act": "silu",
            "rope_theta": 10000.0,
        },
        "image_token_index": IMG,
        "image_break_token_id": BREAK,
        "image_end_token_id": END,
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
    }
    raw.update(overrides)
    return raw


def random_vlm(seed: int = 0, **overrides) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(VLMConfig.from_dict(vlm_raw(**overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3 if "embed" in name or "head" in name else 0.15)
    return model.eval()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt_with(layout, before=(1, 9, 10), after=(11, 12)) -> list[int]:
    return [*before, *placeholder_ids(layout, TOKENS), *after]


@pytest.fixture(scope="module")
def vlm() -> VisionLanguageModel:
    return random_vlm()


def test_config_parse_and_round_trip():
    config = VLMConfig.from_dict(vlm_raw())
    assert config.text.mask_token_id == 3 and config.text.hidden_size == 32
    assert config.text.model_type == "nemotron_labs_diffusion"
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.patch_size) == (32, 2, 14)
    assert config.image_tokens() == TOKENS
    assert VLMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="image_token_index"):
        VLMConfig.from_dict({k: v for k, v in vlm_raw().items() if k != "image_token_index"})
    with pytest.raises(ConfigError, match="vision_config"):
        VLMConfig.from_dict({k: v for k, v in vlm_raw().items() if k != "vision_config"})
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        VLMConfig.from_dict(vlm_raw(vision_feature_layer=[-1, -2]))


@pytest.mark.parametrize("size", [(56, 56), (100, 37), (37, 100), (640, 480), (13, 900), (1, 1)])
def test_placeholders_equal_embeddings(vlm, size):
    """Resized sides are multiples of patch * merge within the limit, and each placeholder gets one vector."""
    config = vlm.config
    pixels, layout = preprocess(picture(*size), config.vision, config.spatial_merge_size)
    assert pixels.shape == (3, layout.height, layout.width) and pixels.dtype == np.float32
    assert layout.height % 28 == 0 and layout.width % 28 == 0
    assert max(layout.height, layout.width) <= config.vision.image_size
    scale = min(1.0, config.vision.image_size / max(size))  # longest side within the limit, aspect kept ...
    for side, resized in zip(size, (layout.width, layout.height)):  # ... up to rounding up to 28 px
        assert resized == max(28, math.ceil(side * scale / 28) * 28)
    prompt = prompt_with(layout)
    assert prompt.count(IMG) == layout.num_image_tokens
    embeds = vlm.prompt_embeds(prompt, [pixels])
    assert embeds.values.shape == (layout.num_image_tokens, config.text.hidden_size)
    assert [prompt[r] for r in embeds.rows] == [IMG] * layout.num_image_tokens


def test_layout_rows_and_breaks():
    config = VLMConfig.from_dict(vlm_raw()).vision
    layout = layout_for(60, 112, config, 2)  # 28 px units: 3 rows, 4 columns
    assert (layout.rows, layout.cols) == (3, 4)
    assert placeholder_ids(layout, TOKENS) == [IMG] * 4 + [BREAK] + [IMG] * 4 + [BREAK] + [IMG] * 4 + [END]


def test_projector_merges_two_by_two(vlm):
    features = vlm.vision_tower(torch.randn(2, 3, 56, 84))
    assert features.shape == (2, 4 * 6, 32)
    assert vlm.multi_modal_projector(features, 4, 6).shape == (2, 2 * 3, vlm.config.text.hidden_size)


def test_image_changes_logits_and_placement(vlm):
    text = vlm.language_model
    pixels_a, layout = preprocess(picture(84, 56, seed=1), vlm.config.vision, 2)
    pixels_b, _ = preprocess(picture(84, 56, seed=2), vlm.config.vision, 2)
    prompt = prompt_with(layout)

    def last_logits(embeds):
        cache, kv = text.new_cache(8), KVCacheManager(8, 16)
        kv.add(0)
        kv.reserve(0, len(prompt))
        seg = models.segments.causal_segment(prompt, 0, write=True)
        if embeds is not None:
            seg.embeds_rows, seg.input_embeds = embeds.within(0, len(prompt))
        return text(models.batch.pack([(0, seg)], kv), cache)[-1]

    a = last_logits(vlm.prompt_embeds(prompt, [pixels_a]))
    b = last_logits(vlm.prompt_embeds(prompt, [pixels_b]))
    plain = last_logits(None)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, plain, atol=1e-4)
    with pytest.raises(ValueError, match="placeholders"):
        vlm.prompt_embeds(prompt[:3] + prompt[4:], [pixels_a])  # one placeholder lost


def test_all_modes_with_images_spec_lossless_and_chunked_prefill(vlm):
    """Spec modes equal AR at temperature 0 with images; prefill chunks that cut an image change nothing."""
    text = vlm.language_model
    images, layouts = zip(*(preprocess(picture(w, h, seed=w), vlm.config.vision, 2) for w, h in ((84, 56), (56, 112))))
    prompt = [1, 9, *placeholder_ids(layouts[0], TOKENS), 10, *placeholder_ids(layouts[1], TOKENS), 11]
    embeds = vlm.prompt_embeds(prompt, list(images))
    ar = models.generate(text, prompt, mode="ar", max_new_tokens=24, embeds=embeds)
    assert ar.tokens != models.generate(text, prompt, mode="ar", max_new_tokens=24).tokens
    for mode in ("linear_spec", "quadratic_spec"):
        for block in (2, 4, 8):
            spec = models.generate(text, prompt, mode=mode, max_new_tokens=24, block_length=block, embeds=embeds)
            assert spec.tokens == ar.tokens, (mode, block)
    diffusion = models.generate(text, prompt, mode="diffusion", max_new_tokens=24, embeds=embeds)
    assert len(diffusion.tokens) > 0
    for chunk in (3, 7, len(prompt)):
        engine = Engine(text, num_pages=16, prefill_chunk=chunk)
        engine.add_request("r", prompt, models.DecodeParams(mode="ar", max_new_tokens=24), embeds)
        tokens = []
        while engine.has_work:
            tokens += [t for out in engine.step() for t in out.new_tokens]
        assert tokens == ar.tokens, chunk


def test_prefix_cache_tells_images_apart(vlm):
    """Equal prompt ids with different pictures share only the pages before the image."""
    text = vlm.language_model
    pixels_a, layout = preprocess(picture(84, 56, seed=1), vlm.config.vision, 2)
    pixels_b, _ = preprocess(picture(84, 56, seed=2), vlm.config.vision, 2)
    prompt = prompt_with(layout, before=(1, *[9] * 20), after=(10,) * 20)
    engine = Engine(text, num_pages=32, page_size=8)

    def run(name: str, pixels) -> list[int]:
        embeds = vlm.prompt_embeds(prompt, [pixels])
        engine.add_request(name, prompt, models.DecodeParams(mode="ar", max_new_tokens=6), embeds)
        tokens = []
        while engine.has_work:
            tokens += [t for out in engine.step() for t in out.new_tokens]
        assert tokens == models.generate(text, prompt, max_new_tokens=6, embeds=embeds).tokens
        return tokens

    run("a", pixels_a)
    before_image = prompt.index(vlm.config.image_token_id) // 8 * 8
    run("b", pixels_b)
    assert engine.stats.prefix_hits == before_image
    run("c", pixels_a)
    assert engine.stats.prefix_hits == before_image + (len(prompt) - 1) // 8 * 8


def test_prompt_embeds_within_slices():
    embeds = PromptEmbeds(rows=[2, 3, 5], values=torch.arange(3.0)[:, None])
    assert embeds.within(0, 2) is None
    rows, values = embeds.within(3, 6)
    assert rows == [0, 2] and values.flatten().tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "style",
    [
        {"vision_tower.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector.", "language_model.": ""},
        {"vision_tower.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector."},
        {
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
            "language_model.": "model.language_model.",
        },
    ],
)
def test_save_and_load_prefix_styles(tmp_path, vlm, style):
    """The official folder with each prefix style seen in the wild loads to the same model."""
    save_vlm(vlm, tmp_path)
    raw = load_file(tmp_path / "model.safetensors")

    def renamed(name: str) -> str:
        for old, new in style.items():
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    save_file({renamed(k): v for k, v in raw.items()}, tmp_path / "model.safetensors")
    text_config, vlm_config = read_config(tmp_path)
    assert vlm_config == vlm.config and text_config == vlm.config.text
    loaded = load_vlm(tmp_path)
    for name, tensor in vlm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nemotron_labs_diffusion_vlm"


def test_unknown_prefix_is_a_clear_error(tmp_path, vlm):
    save_vlm(vlm, tmp_path)
    raw = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("language_model.", "decoder.text."): v for k, v in raw.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="text model.*'decoder.text.'"):
        load_vlm(tmp_path)


def test_encoder_and_projector_match_the_transformers_reference(vlm):
    """Same weights, same numbers as transformers' Pixtral encoder and Mistral3 projector (installed
    package, random config: nothing is downloaded). Pins the 2D RoPE layout and the merge order."""
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig, PixtralVisionModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    vc = vlm.config.vision
    vision_config = PixtralVisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads,
        head_dim=vc.head_dim,
        patch_size=vc.patch_size,
        image_size=vc.image_size,
        hidden_act=vc.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": vc.rope_theta},
    )
    config = Mistral3Config(
        vision_config=vision_config,
        text_config=MistralConfig(hidden_size=vlm.config.text.hidden_size, rms_norm_eps=vlm.config.text.rms_norm_eps),
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
    )
    encoder, projector = PixtralVisionModel(vision_config).eval(), Mistral3MultiModalProjector(config).eval()
    state = vlm.state_dict()
    for module, prefix in ((encoder, "vision_tower."), (projector, "multi_modal_projector.")):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    pixels = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        reference = encoder(pixels, image_sizes=torch.tensor([[56, 84]])).last_hidden_state
        features = vlm.vision_tower(pixels)
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-4)
        expected = projector(reference[0], torch.tensor([[56, 84]]))
        torch.testing.assert_close(vlm.image_embeddings(pixels)[0], expected, atol=1e-5, rtol=1e-4)


def test_placeholder_ids_fall_back_to_the_tokenizer():
    from models.loading import load_tokenizer
    from tests.conftest import REPO

    raw = {k: v for k, v in vlm_raw().items() if k not in ("image_break_token_id", "image_end_token_id")}
    config = VLMConfig.from_dict(raw)
    assert config.image_tokens(load_tokenizer(REPO / "models" / "bundled" / "tiny-vlm")) == TOKENS
    with pytest.raises(ConfigError, match=r"\[IMG_BREAK\]"):
        config.image_tokens()
