"""Train the tiny VLM on synthetic shapes with the family's recipe: ``python -m cluster.train_vlm``.

The objective is ``models.training.joint_loss`` (joint AR + block diffusion) with the projected
image embeddings on the prompt's placeholders: the image rows are never masked and are the same in
both halves of ``[noisy | clean]`` (see models/training.py). Pictures are drawn on the fly, so every
step sees new data; the tokenizer is word-level over the captions, questions and chat roles, with
the family's specials and Pixtral's ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``.

It reuses ``cluster.train``'s settings, initialiser, learning-rate schedule and export layout, but
runs in one process without Ray Train: the model is small enough for one CPU core in minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cluster.train import TOKENIZER_FILES, TrainSettings, init_weights, learning_rate
from models.data import CHAT_TEMPLATE, SPECIAL_TOKENS
from models.generate import generate
from models.loading import load_tokenizer, resolve_dtype
from models.training import draw_noise, joint_loss
from models.vlm import VisionLanguageModel, VLMConfig, load_vlm, save_vlm
from vision.preprocess import ImageTokens, placeholder_text, preprocess
from vision.shapes import COLOURS, QUESTIONS, SHAPES, draw

IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
ROLES = ("system", "user", "assistant", "developer", "tool")


def train_word_tokenizer(out_dir: Path, model_max_length: int):
    """A word-level tokenizer over everything the task says (lower-cased; other words are <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = {"a", ":", *ROLES, *SHAPES, *COLOURS}
    words.update(word for question in QUESTIONS for word, _ in split(question.lower()))
    specials = [*SPECIAL_TOKENS, *IMAGE_TOKENS, "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
               "unk_token": "<unk>", "additional_special_tokens": list(IMAGE_TOKENS)}  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": True, "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return load_tokenizer(out_dir)


def vlm_config(s: TrainSettings, tokenizer) -> VLMConfig:
    v = s.extra
    text = s.model_config().to_dict()
    text["vocab_size"] = len(tokenizer)
    raw = {
        "model_type": "nemotron_labs_diffusion_vlm",
        "text_config": text,
        "vision_config": {
            "hidden_size": v["vision_hidden"],
            "intermediate_size": 2 * v["vision_hidden"],
            "num_hidden_layers": v["vision_layers"],
            "num_attention_heads": v["vision_heads"],
            "patch_size": 14,
            "image_size": v["image_size"],
            "hidden_act": "silu",
            "rope_theta": 10000.0,
        },
        "image_token_index": tokenizer.convert_tokens_to_ids("[IMG]"),
        "image_break_token_id": tokenizer.convert_tokens_to_ids("[IMG_BREAK]"),
        "image_end_token_id": tokenizer.convert_tokens_to_ids("[IMG_END]"),
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
    }
    return VLMConfig.from_dict(raw)


def chat_prompt(tokenizer, question: str, image_text: str, image_first: bool) -> list[int]:
    """The serving chat layout (the ingress renders the same template with the same placeholder text)."""
    content = image_text + question if image_first else question + image_text
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def make_batch(model: VisionLanguageModel, tokenizer, tokens: ImageTokens, rng: random.Random, s: TrainSettings):
    """Token ids [B, N] (caption and EOS after the prompt, then padding) and pixels [B, C, H, W]."""
    config = model.config
    rows, pixels = [], []
    for _ in range(s.batch_size):
        picture = draw(rng, s.extra["picture_size"])
        array, layout = preprocess(picture.image, config.vision, config.spatial_merge_size)
        image_text = placeholder_text(layout, tokens, tokenizer)
        ids = chat_prompt(tokenizer, rng.choice(QUESTIONS), image_text, rng.random() < 0.5)
        ids += tokenizer.encode(" " + picture.caption, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(ids) > s.seq_len:
            raise ValueError(f"an example has {len(ids)} tokens; raise seq_len")
        rows.append(ids + [tokenizer.pad_token_id] * (s.seq_len - len(ids)))
        pixels.append(torch.from_numpy(array))
    return torch.tensor(rows), torch.stack(pixels)


def accuracy(model: VisionLanguageModel, tokenizer, tokens: ImageTokens, seed: int, n: int, mode: str = "ar") -> float:
    """Share of ``n`` fresh pictures whose greedy answer names the right colour and shape."""
    rng = random.Random(seed)
    config = model.config
    right = 0
    for _ in range(n):
        picture = draw(rng)
        array, layout = preprocess(picture.image, config.vision, config.spatial_merge_size)
        prompt = chat_prompt(tokenizer, QUESTIONS[0], placeholder_text(layout, tokens, tokenizer), False)
        embeds = model.prompt_embeds(prompt, [array])
        out = generate(model.language_model, prompt, mode=mode, max_new_tokens=8, temperature=0.0, embeds=embeds)
        answer = tokenizer.decode(out.tokens, skip_special_tokens=True)
        right += picture.colour in answer.split() and picture.shape in answer.split()
    return right / n


def train(s: TrainSettings) -> Path:
    torch.set_num_threads(int(s.cpus_per_worker))
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
    tokenizer = train_word_tokenizer(out / "tokenizer", s.seq_len)
    config = vlm_config(s, tokenizer)
    model = VisionLanguageModel(config)
    init_weights(model, s.seed)
    with torch.no_grad():  # every RMSNorm starts at one, the encoder's ``ln_pre`` too (not named "norm")
        model.vision_tower.ln_pre.weight.fill_(1.0)
    if s.init_from:  # continue from an exported tiny VLM (its tokenizer is the same word list)
        model.load_state_dict(load_vlm(s.init_from, dtype=torch.float32, tokenizer=False, warm_up=False).state_dict())
    tokens = config.image_tokens()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    rng = random.Random(s.seed)
    noise_gen = torch.Generator().manual_seed(s.seed)
    started = time.time()
    for step in range(s.steps):
        batch, pixels = make_batch(model, tokenizer, tokens, rng, s)
        embeds_mask = batch == config.image_token_id
        image = model.image_embeddings(pixels)  # [B, rows*cols, H]
        input_embeds = torch.zeros(*batch.shape, image.shape[-1], dtype=image.dtype)
        input_embeds = input_embeds.masked_scatter(embeds_mask[..., None], image.reshape(-1, image.shape[-1]))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        parts = joint_loss(
            model.language_model,
            batch,
            draw_noise(batch, noise_gen),
            block_size=s.block_size,
            dlm_weight=s.dlm_weight,
            ar_weight=s.ar_weight,
            input_embeds=input_embeds,
            embeds_mask=embeds_mask,
        )
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        done = step + 1
        if done % s.eval_every == 0 or done == s.steps:
            model.eval()
            acc = accuracy(model, tokenizer, tokens, seed=10_000 + done, n=s.eval_sequences)
            model.train()
            record = {"step": done, "loss": parts.loss.item(), "ar_accuracy": acc, "wall_s": time.time() - started}
            print(json.dumps(record), flush=True)
            with open(out / "history.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
    folder = out / "model"
    save_vlm(model, folder, dtype=resolve_dtype(s.save_dtype, config.text))
    for name in TOKENIZER_FILES:
        shutil.copy(out / "tokenizer" / name, folder / name)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this entry point and of ``triserve train-vlm``."""
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--init-from", default=None, help="an exported tiny VLM to continue from")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> Path:
    """Train, export to ``output/model``, and report the exported model's accuracy in every mode."""
    settings = TrainSettings(
        output=args.output,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        seq_len=32,
        block_size=4,
        batch_size=32,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        init_from=args.init_from,
        warmup=100,
        eval_every=args.eval_every,
        eval_sequences=50,
        cpus_per_worker=args.threads,
        save_dtype="bfloat16",
        extra={"vision_hidden": 128, "vision_layers": 2, "vision_heads": 4, "image_size": 84, "picture_size": 84},
    )
    folder = train(settings)
    model = load_vlm(folder)  # the exported (bf16) weights, as served
    tokens = model.config.image_tokens()
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        acc = accuracy(model, model.language_model.tokenizer, tokens, seed=99_999, n=50, mode=mode)
        print(json.dumps({"exported": str(folder), "mode": mode, "accuracy@50": acc}), flush=True)
    return folder


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    run(cli.parse_args())
