"""``triserve train-vlm``: the joint objective with images, end to end on a few steps."""

from __future__ import annotations

import json

import torch

from deployments.cli import main
from models.training import Noise, joint_loss
from models.vlm import load_vlm


def test_image_rows_are_never_masked(tmp_path):
    """With every token drawn as masked, the diffusion loss still covers only the text rows."""
    from tests.test_vlm import random_vlm

    text = random_vlm().language_model
    batch = torch.randint(7, 64, (2, 10))
    batch[:, 2:5] = 4  # image placeholders
    embeds_mask = batch == 4
    input_embeds = torch.randn(2, 10, text.config.hidden_size)
    noise = Noise(masked=torch.ones(2, 10, dtype=torch.bool), p=torch.ones(2))
    parts = joint_loss(text, batch, noise, block_size=4, input_embeds=input_embeds, embeds_mask=embeds_mask)
    assert parts.masked_tokens == 2 * 7
    other = joint_loss(text, batch, noise, block_size=4, input_embeds=input_embeds * 2, embeds_mask=embeds_mask)
    assert not torch.isclose(parts.loss, other.loss)  # the image embeddings reach the loss


def test_train_vlm_command_writes_a_loadable_vlm(tmp_path, capsys):
    assert main(["train-vlm", "--output", str(tmp_path), "--steps", "20", "--eval-every", "20"]) == 0
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [20] and history[0]["loss"] > 0
    model = load_vlm(tmp_path / "model")
    assert model.config.image_tokens().image == model.language_model.tokenizer.convert_tokens_to_ids("[IMG]")
    assert '"mode": "quadratic_spec"' in capsys.readouterr().out
