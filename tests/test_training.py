"""The joint training objective, its attention mask, and training through Ray Train."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import models
from models.training import Noise, joint_loss, training_mask
from tests.conftest import random_model


def test_mask_has_exactly_the_four_regions():
    n, block = 8, 4
    mask = training_mask(n, block)
    for q in range(2 * n):
        for k in range(2 * n):
            q_noisy, k_noisy = q < n, k < n
            qi, ki = q % n, k % n
            if q_noisy and k_noisy:
                allowed = qi // block == ki // block  # own noisy block, both directions
            elif q_noisy:
                allowed = ki // block < qi // block  # clean blocks strictly before
            elif k_noisy:
                allowed = False  # clean never sees noisy
            else:
                allowed = ki <= qi  # clean half is causal
            assert bool(mask[q, k]) == allowed, (q, k)


def test_loss_matches_direct_recomputation():
    model = random_model(seed=2, block_size=4)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(4, model.config.vocab_size, (3, 12), generator=gen)
    masked = torch.rand(3, 12, generator=gen) < 0.4
    masked[0, 0] = True
    p = torch.tensor([0.4, 0.25, 0.9])
    parts = joint_loss(model, batch, Noise(masked, p), block_size=4, dlm_weight=0.3, ar_weight=1.0)

    # recompute term by term, one sequence and one token at a time
    mask_id = model.config.mask_token_id
    attn = training_mask(12, 4)
    positions = torch.arange(12).repeat(2)
    total_diff, total_ar = 0.0, 0.0
    for b in range(3):
        noisy = torch.where(masked[b], torch.tensor(mask_id), batch[b])
        logits = model.forward_dense(torch.cat([noisy, batch[b]])[None], positions, attn)[0]
        for i in range(12):
            if masked[b, i]:
                total_diff += F.cross_entropy(logits[i][None], batch[b, i][None]).item() / p[b].item()
            if i < 11:
                total_ar += F.cross_entropy(logits[12 + i][None], batch[b, i + 1][None]).item()
    count = int(masked.sum()) + 3 * 11
    assert parts.masked_tokens == int(masked.sum()) and parts.ar_tokens == 33
    assert parts.loss.item() == pytest.approx((0.3 * total_diff + total_ar) / count, rel=1e-4)
    parts.loss.backward()  # differentiable end to end
    assert model.diffusion_head.weight.grad is not None


def test_ar_rows_limit_the_ar_term_to_real_text():
    model = random_model(seed=2, block_size=4)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(4, model.config.vocab_size, (3, 12), generator=gen)
    noise = Noise(torch.rand(3, 12, generator=gen) < 0.5, torch.tensor([0.5, 0.5, 0.5]))
    every = joint_loss(model, batch, noise, block_size=4)
    assert joint_loss(model, batch, noise, block_size=4, ar_rows=torch.ones(3, dtype=torch.bool)).loss == every.loss
    real = torch.tensor([True, False, True])
    parts = joint_loss(model, batch, noise, block_size=4, ar_rows=real)
    alone = [
        joint_loss(model, batch[i : i + 1], Noise(noise.masked[i : i + 1], noise.p[:1]), block_size=4) for i in (0, 2)
    ]
    assert parts.ar_tokens == 22 and parts.ar_sum.item() == pytest.approx(sum(a.ar_sum.item() for a in alone), rel=1e-5)
    assert parts.diffusion_sum.item() == pytest.approx(every.diffusion_sum.item(), rel=1e-6)  # every row's masks count


def test_self_distilled_rows_are_the_models_greedy_continuations(tmp_path):
    from cluster.train import TrainSettings, batch_rows, distilled
    from models.loading import save_model

    model = random_model(seed=3, eos_token_id=None)
    save_model(model, tmp_path / "init")
    train = torch.randint(4, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    s = TrainSettings(output=str(tmp_path), init_from=str(tmp_path / "init"), seq_len=20, batch_size=4)
    s.distill_fraction, s.distill_prefix, s.distill_sequences = 0.25, 8, 3
    rows = distilled(s, train)
    assert rows.shape == (3, 20)
    for row in rows.tolist():
        assert row[8:] == models.generate(model, row[:8], mode="ar", max_new_tokens=12).tokens
    batch, real = batch_rows(s, torch.tensor([0, 1, 2, 3]), {"train": train[:, :20], "distill": rows}, step=5)
    assert real.tolist() == [True, True, True, False] and batch[:3].tolist() == train[:3, :20].tolist()
    assert batch[3].tolist() in rows.tolist()
    with pytest.raises(ValueError):
        distilled(TrainSettings(output=str(tmp_path), distill_fraction=0.25), train)  # no init_from


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    for i in range(6):
        (root / f"mod{i}.py").write_text(text * (3 + i))
    (root / "pkg" / "util.py").write_text(text * 4)
    (root / "zeta.py").write_text(text * 5)  # held out (t-z)
    (root / "tests" / "test_all.py").write_text("assert False\n")  # test suites are excluded
    return root


def test_corpus_split(tmp_path):
    from models.data import corpus_files

    root = _corpus(tmp_path)
    train, heldout = corpus_files(root)
    assert [p.name for p in heldout] == ["zeta.py"]
    assert "test_all.py" not in {p.name for p in train} and len(train) == 7


@pytest.mark.ray
def test_train_on_ray_writes_loadable_model_and_resumes(tmp_path, ray_local):
    from cluster.train import TrainSettings, run

    settings = dict(
        output=str(tmp_path / "run"),
        corpus=str(_corpus(tmp_path)),
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        seq_len=32,
        block_size=8,
        batch_size=2,
        steps=2,
        warmup=1,
        eval_every=1,
        checkpoint_every=1,
        eval_sequences=2,
        cpus_per_worker=0.5,
    )
    folder = run(TrainSettings(**settings))
    model = models.load_model(folder)
    assert model.config.vocab_size == 300 and model.tokenizer.mask_token_id == 3
    assert models.generate(model, model.tokenizer.encode("def "), mode="linear_spec", max_new_tokens=4).tokens
    first = [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert first == [1, 2]

    run(TrainSettings(**{**settings, "steps": 3, "resume": True}))
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]  # continued at step 3, did not redo 1-2
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3 and "eval_ar_ce" in history[-1]

    # a self-distilled fine-tune from it, the initial model named by a relative path (the workers
    # run elsewhere: the driver makes it absolute)
    distill = {"init_from": os.path.relpath(folder), "distill_fraction": 0.5, "distill_sequences": 8}
    tuned = run(TrainSettings(**{**settings, "output": str(tmp_path / "tuned"), "distill_prefix": 8, **distill}))
    data = torch.load(tmp_path / "tuned" / "data" / "sequences.pt")
    assert data["distill"].shape[1] == 32 and len(data["distill"]) >= 1
    assert models.load_model(tuned).state_dict().keys() == model.state_dict().keys()


def test_initialise_from_an_ar_checkpoint(tmp_path):
    """A Mistral-layout AR checkpoint (model.*, lm_head) initialises the tri-mode model."""
    from safetensors.torch import save_file

    from cluster.train import initialise_from
    from models.model import TriModeModel

    source = random_model(seed=31)
    folder = tmp_path / "ar"
    folder.mkdir()
    tensors = {
        name.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): p.detach().clone()
        for name, p in source.named_parameters()
    }
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    target = TriModeModel(source.config)
    initialise_from(target, folder)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.ray
def test_train_drafter_writes_an_adapter_that_keeps_ar_and_resumes(tmp_path, monkeypatch, ray_local, fixture_path):
    from cluster.train_drafter import DrafterSettings, run

    model_dir = tmp_path / "model"
    shutil.copytree(fixture_path, model_dir)
    adapter_dir = model_dir / "linear_spec_lora"
    settings = dict(
        model=str(model_dir),
        output=str(adapter_dir),
        workdir=str(tmp_path / "work"),
        corpus=str(_corpus(tmp_path)),
        rank=4,
        alpha=8.0,
        mlp_rank=2,
        sequences=6,
        heldout_sequences=2,
        prefix_min=4,
        prefix_max=8,
        seq_len=40,
        blocks="4,8",
        batch_size=2,
        steps=2,
        warmup=1,
        eval_every=1,
        checkpoint_every=1,
        cpus_per_worker=0.5,
        threads=1,
    )
    assert run(DrafterSettings(**settings)) == adapter_dir
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    history = [json.loads(line) for line in (tmp_path / "work" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and {"eval_accepted@4", "eval_accepted@8"} <= set(history[-1])

    base, drafter = models.load_model(fixture_path), models.load_model(model_dir)
    assert drafter.has_adapter and not base.has_adapter
    lora = drafter.encoder.layers[0].self_attn.lora
    assert lora.a.shape == (4, base.config.q_size) and lora.b.abs().sum() > 0  # trained away from B = 0
    down = drafter.encoder.layers[0].mlp.lora["down_proj"]
    assert down.a.shape == (2, base.config.intermediate_size) and down.b.abs().sum() > 0
    ids = base.tokenizer.encode("def add(a, b):\n    return")
    assert models.score(base, ids) == models.score(drafter, ids)  # AR rows never see the adapter
    ar = models.generate(base, ids, mode="ar", max_new_tokens=16)
    assert models.generate(drafter, ids, mode="linear_spec", max_new_tokens=16, block_length=8).tokens == ar.tokens

    run(DrafterSettings(**{**settings, "steps": 3, "resume": True}))
    history = [json.loads(line) for line in (tmp_path / "work" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]  # continued at step 3

    # a new stage from the saved drafter, its folders named relative to here (the workers run elsewhere)
    monkeypatch.chdir(tmp_path)
    stage = {**settings, "workdir": "stage2", "output": "stage2_lora", "init_adapter": "model/linear_spec_lora"}
    assert run(DrafterSettings(**{**stage, "steps": 1, "lr": 0.0})).resolve() == (tmp_path / "stage2_lora").resolve()
    before, after = (tmp_path / d / "adapter_model.safetensors" for d in ("model/linear_spec_lora", "stage2_lora"))
    assert before.read_bytes() == after.read_bytes()  # it started from the saved drafter (and a rate of 0 kept it)
