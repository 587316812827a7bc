"""The drafter's training graph is the serving draft: same visibility, same adapter rows, same logits."""

from __future__ import annotations

import pytest
import torch

from models.batch import pack
from models.draft_training import DraftAdapter, accepted_length, draft_logits, draft_loss, draft_mask
from models.engine import KVCacheManager
from models.loading import load_adapter
from models.segments import bidirectional_segment, causal_segment
from tests.conftest import random_model


def test_draft_mask_is_a_causal_prefix_then_a_bidirectional_block():
    mask = draft_mask(cut=3, block=2)
    assert mask[:3, :3].equal(torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert not mask[:3, 3:].any()  # the prefix never sees the block
    assert mask[3:].all()  # the block sees the prefix and all of itself


def test_training_draft_logits_equal_the_serving_draft():
    model = random_model(seed=5)
    adapter = DraftAdapter(model, rank=4, alpha=8.0, seed=1, mlp_rank=2)  # o_proj and the MLP
    with torch.no_grad():
        for name, factor in adapter.named_parameters():
            if name.endswith("_B"):
                factor.normal_(0.0, 0.5)  # a trained-looking adapter, so it changes the drafts
    adapter.attach(model)
    seq = torch.randint(4, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    cut, block = 11, 6
    with torch.no_grad():
        trained = draft_logits(model, seq, cut, block)[0]
    kv = KVCacheManager(8, 8, max_seqs=1, prefix_caching=False)
    kv.add(0)
    kv.reserve(0, cut + block)
    cache = model.new_cache(8, 8)
    model(pack([(0, causal_segment(seq[0, :cut].tolist(), 0, write=True))], kv), cache)  # the prefill
    kv.set_length(0, cut)
    draft = bidirectional_segment([int(seq[0, cut])] + [model.config.mask_token_id] * (block - 1), cut, adapter=True)
    served = model(pack([(0, draft)], kv), cache)[1:]
    torch.testing.assert_close(trained, served, rtol=1e-4, atol=1e-4)
    assert trained.argmax(-1).equal(served.argmax(-1))


def test_loss_trains_the_adapter_only_and_counts_accepted_prefixes():
    model = random_model(seed=6)
    adapter = DraftAdapter(model, rank=2, alpha=2.0, mlp_rank=2)
    adapter.attach(model)
    seq = torch.randint(4, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    loss, accepted = draft_loss(model, seq, cut=5, block=8, decay=0.9)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the base model is frozen
    b_factors = [f for name, f in adapter.named_parameters() if name.endswith("_B")]
    assert len(b_factors) == 4 * model.config.num_hidden_layers  # o_proj, gate, up, down in every layer
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in b_factors)
    assert accepted.shape == (3,) and bool(((accepted >= 0) & (accepted <= 7)).all())
    logits = torch.full((2, 4, 10), -5.0)
    targets = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]])
    logits[0, torch.arange(4), targets[0]] = 5.0  # all four agree
    logits[1, torch.arange(4), torch.tensor([1, 5, 3, 4])] = 5.0  # the second disagrees
    assert accepted_length(logits, targets, mask_id=0).tolist() == [4, 1]


def test_training_continues_from_a_saved_drafter(tmp_path):
    model = random_model(seed=7)
    trained = DraftAdapter(model, rank=2, alpha=2.0, seed=1, mlp_rank=2)
    with torch.no_grad():
        for param in trained.parameters():
            param.normal_()
    trained.save(tmp_path, base_model="random")
    load_adapter(model, tmp_path)
    resumed = DraftAdapter(model, rank=2, alpha=2.0, seed=2, mlp_rank=2)
    resumed.start_from(model)
    for (name, a), (_, b) in zip(trained.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="does not match o_proj of layer 0"):
        DraftAdapter(model, rank=4, alpha=4.0, mlp_rank=2).start_from(model)
    with pytest.raises(ValueError, match="does not match"):
        DraftAdapter(model, rank=2, alpha=4.0, mlp_rank=2).start_from(model)  # another scale
