"""Row statistics and the diffusion unmask rule: Triton kernels vs PyTorch references, on CPU through the
Triton interpreter.

Tie rule under test: the lowest index wins, like ``torch.argmax`` (the token among equal logits, the slot
among equal confidences). Confidences are built with a clear margin from the threshold, since the
reference computes them in float64 and the kernel in fp32.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.row_stats import (  # noqa: E402
    MAX_BLOCK_V,
    row_argmax,
    row_stats_reference,
    row_stats_triton,
    unmask_reference,
    unmask_triton,
)

MASK = 3
PAD = -1


def _check_row_stats(logits: torch.Tensor, exclude_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    prob, token = row_stats_triton(logits, exclude_id)
    ref_prob, ref_token = row_stats_reference(logits, exclude_id)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(prob, ref_prob, rtol=1e-5, atol=1e-7)
    return prob, token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("shape", "vocab"), [((40,), 4096), ((3, 7), 256), ((2,), 4096), ((9,), 100)])
def test_row_argmax_is_torch_argmax(shape: tuple[int, ...], vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn((*shape, vocab), generator=gen).to(dtype)
    flat = logits.view(-1, vocab)
    flat[0] = float("-inf")  # nothing allowed: index 0, like torch
    flat[1, [70 % vocab, 200 % vocab]] = 1e4  # a tie across chunks: the lower index
    flat[-1, [130 % vocab, 131 % vocab]] = 1e4  # a tie inside a chunk
    flat[-1, 3] = float("-inf")
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("exclude_id", [MASK, None])
@pytest.mark.parametrize(("shape", "vocab"), [((5,), 37), ((2, 3), 1000), ((3,), MAX_BLOCK_V + 904)])
def test_row_stats_matches_reference(shape: tuple[int, ...], vocab: int, exclude_id: int | None) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn((*shape, vocab), generator=gen) * 4
    logits[..., MASK] += 30  # the excluded token is the row maximum: the choice must be the runner-up
    prob, token = _check_row_stats(logits, exclude_id)
    assert token.shape == shape and prob.dtype == torch.float32
    assert bool((token == MASK).all()) == (exclude_id is None)


def test_row_stats_ties_lowest_index_wins() -> None:
    vocab = MAX_BLOCK_V + 100  # two chunks
    logits = torch.zeros(5, vocab)
    logits[0, [7, 2, 50]] = 5.0  # tie inside a chunk -> 2
    logits[1, [10, MAX_BLOCK_V + 3]] = 5.0  # tie across chunks -> 10
    logits[2, [MASK, 9, MAX_BLOCK_V + 1]] = 5.0  # lowest tied index excluded -> 9
    logits[3, MAX_BLOCK_V + 50] = 1.0  # maximum in the second chunk only
    logits[4] = -2.0  # every logit tied -> 0
    _, token = _check_row_stats(logits, MASK)
    assert token.tolist() == [2, 10, 9, MAX_BLOCK_V + 50, 0]


def test_row_stats_bf16_logits_upcast_on_load() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 300, generator=gen) * 3).to(torch.bfloat16)
    logits[0, [5, 6]] = 9.0  # bf16 ties are common: lowest index
    _, token = _check_row_stats(logits, MASK)
    assert token[0] == 5


def _row(conf: float, winner: int, vocab: int, mask_prob: float = 0.0) -> torch.Tensor:
    """Logits whose softmax gives ``winner`` probability ``conf`` and the mask token ``mask_prob``."""
    probs = torch.full((vocab,), (1.0 - conf - mask_prob) / (vocab - 2), dtype=torch.float64)
    probs[winner], probs[MASK] = conf, mask_prob
    return probs.log().float()


def _case(confs: list[list[float | tuple[float, int] | None]], vocab: int = 50):
    """Blocks, logits and argmax tokens from per-slot confidences: None is a committed slot (token 1), a
    float a masked slot whose argmax is token 10 + slot with that confidence, a (confidence, token) pair
    sets the token too (equal pairs give bitwise equal rows: exact ties). The mask token takes 0.04 of
    the probability where it fits."""
    length = max(len(c) for c in confs)
    blocks = torch.full((len(confs), length), PAD, dtype=torch.int64)
    winners = torch.full_like(blocks, PAD)
    logits = torch.zeros(len(confs), length, vocab)
    for b, row in enumerate(confs):
        for i, conf in enumerate(row):
            c, winner = (0.5, 10 + i) if conf is None else conf if isinstance(conf, tuple) else (conf, 10 + i)
            blocks[b, i] = 1 if conf is None else MASK
            winners[b, i] = winner
            logits[b, i] = _row(c, winner, vocab, mask_prob=0.04 if c < 0.95 else 0.0)
    return blocks, logits, winners


def _check_unmask(blocks, logits, winners, threshold, min_count=None) -> torch.Tensor:
    got_blocks, ref_blocks = blocks.clone(), blocks.clone()
    got = unmask_triton(got_blocks, logits, MASK, threshold, min_count)
    expected = unmask_reference(ref_blocks, logits, MASK, threshold, min_count)
    assert torch.equal(got, expected)
    assert torch.equal(got_blocks, ref_blocks)
    assert torch.equal(got_blocks[got], winners[got])  # committed the argmax token
    assert torch.equal(got_blocks[~got], blocks[~got])  # nothing else changed
    return got


def test_unmask_rule_by_hand() -> None:
    blocks, logits, winners = _case(
        [
            [None, 0.5, 0.95, 0.3, 0.97, 0.2],  # the slots >= 0.9: 2 and 4
            [None, 0.3, (0.6, 20), (0.6, 20), 0.1],  # none reaches it: the most confident, tie -> slot 2
            [None, None, None],  # nothing masked: nothing committed (ragged: padded)
            [0.2, 0.05],  # none reaches it: the most confident (ragged: padded)
            [0.92, 0.91, 0.93, 0.95, 0.99, 0.9 + 1e-3],  # all qualify
        ]
    )
    got = _check_unmask(blocks, logits, winners, threshold=0.9)
    expected = [[2, 4], [2], [], [0], [0, 1, 2, 3, 4, 5]]
    assert [torch.nonzero(row).flatten().tolist() for row in got] == expected
    assert (blocks[blocks == PAD] == PAD).all()


def test_unmask_schedule_and_min_count() -> None:
    """threshold None commits min_count slots (the step schedule); min_count above the masked count
    commits every masked slot; ties at the cut go to the lower slot."""
    tie = (0.4, 30)
    blocks, logits, winners = _case([[None, tie, 0.8, tie, 0.6], [0.3, 0.2, None], [(0.5, 31)] * 4])
    got = _check_unmask(blocks, logits, winners, threshold=None, min_count=torch.tensor([3, 5, 2]))
    assert [torch.nonzero(row).flatten().tolist() for row in got] == [[1, 2, 4], [0, 1], [0, 1]]
    got = _check_unmask(blocks, logits, winners, threshold=0.7, min_count=torch.tensor([1, 1, 3]))
    assert [torch.nonzero(row).flatten().tolist() for row in got] == [[2], [0], [0, 1, 2]]


@pytest.mark.parametrize("threshold", [0.9, 0.5, None])
def test_unmask_random_batch(threshold: float | None) -> None:
    """Distinct confidences per block (near-equal ones would be ties decided by rounding), far from the
    thresholds; ragged lengths, some blocks with no masked slot left."""
    gen = torch.Generator().manual_seed(7)
    batch, length, vocab = 6, 11, 300
    levels = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.7, 0.8, 0.95, 0.99])
    confs = []
    for b in range(batch):
        n = length - b % 3
        row = levels[torch.randperm(len(levels), generator=gen)[:n]].tolist()
        keep = torch.rand(n, generator=gen) < (0.0 if b == batch - 1 else 0.7)
        confs.append([c if k else None for c, k in zip(row, keep.tolist())])
    blocks, logits, winners = _case(confs, vocab)
    min_count = torch.randint(0, 4, (batch,), generator=gen)
    _check_unmask(blocks, logits, winners, threshold, min_count)
    _check_unmask(blocks, logits, winners, threshold)


def test_unmask_confidence_is_the_full_softmax() -> None:
    """The candidate excludes the mask token, even when it is the most probable, but its confidence
    is its probability under the full row, mask token included."""
    logits = torch.stack([_row(0.3, 12, 50, mask_prob=0.6), _row(0.2, 13, 50, mask_prob=0.7)])[None]
    blocks = torch.full((1, 2), MASK)
    prob, token = row_stats_triton(logits, MASK)
    assert token.tolist() == [[12, 13]]
    torch.testing.assert_close(prob, torch.tensor([[0.3, 0.2]]), rtol=1e-5, atol=0.0)
    assert unmask_triton(blocks, logits, MASK, 0.9).tolist() == [[True, False]]
    assert blocks.tolist() == [[12, MASK]]
