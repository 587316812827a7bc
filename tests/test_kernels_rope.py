"""Rotary embedding Triton kernel vs its PyTorch reference, on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.rope import rope_reference, rope_triton  # noqa: E402
from models.config import RopeConfig  # noqa: E402
from models.layers import Rotary  # noqa: E402

ROPE = RopeConfig(
    rope_type="yarn", theta=10_000.0, factor=4.0, original_max_position_embeddings=16, llama_4_scaling_beta=0.1
)


def _inputs(t: int, q_heads: int, kv_heads: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Packed, non-contiguous positions as a batch of segments has them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, q_heads, d, generator=gen).to(dtype)
    k = torch.randn(t, kv_heads, d, generator=gen).to(dtype)
    positions = torch.randint(0, 200, (t,), generator=gen)
    cos, sin, scale = Rotary(ROPE, d)(positions, dtype)
    return q, k, cos, sin, scale


@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize(("t", "q_heads", "kv_heads", "d"), [(1, 2, 1, 8), (7, 6, 2, 24), (13, 4, 4, 64)])
def test_fp32_matches_reference(t: int, q_heads: int, kv_heads: int, d: int, with_scale: bool) -> None:
    q, k, cos, sin, scale = _inputs(t, q_heads, kv_heads, d, torch.float32)
    scale = scale if with_scale else None
    for got, expected in zip(rope_triton(q, k, cos, sin, scale), rope_reference(q, k, cos, sin, scale)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_dtypes(dtype: torch.dtype) -> None:
    """The kernel rounds once: it equals the fp32 reference on the upcast inputs rounded to ``dtype``
    bitwise, and the reference in ``dtype`` (which rounds after every op) to about one ulp."""
    q, k, cos, sin, scale = _inputs(9, 4, 2, 32, dtype, seed=1)
    got = rope_triton(q, k, cos, sin, scale)
    wide = rope_reference(q.float(), k.float(), cos.float(), sin.float(), scale.float())
    narrow = rope_reference(q, k, cos, sin, scale)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    for out, w, n in zip(got, wide, narrow):
        assert out.dtype == dtype
        assert torch.equal(out, w.to(dtype))
        torch.testing.assert_close(out, n, **tolerance)


def test_strided_heads_from_a_fused_projection() -> None:
    """q and k as views of one fused qkv output (row stride larger than heads x D)."""
    gen = torch.Generator().manual_seed(2)
    t, d = 6, 16
    qkv = torch.randn(t, 4 + 2 + 2, d, generator=gen)
    q, k = qkv[:, :4], qkv[:, 4:6]
    _, _, cos, sin, scale = _inputs(t, 4, 2, d, torch.float32)
    for got, expected in zip(rope_triton(q, k, cos, sin, scale), rope_reference(q, k, cos, sin, scale)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
