"""The model with the Triton kernels forced on (CPU interpreter) decodes as with the references."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import kernels  # noqa: E402
import models  # noqa: E402

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_forced_triton_kernels_give_the_reference_tokens(fixture_model, monkeypatch, mode):
    prompt = fixture_model.tokenizer.encode("def main():\n    ")
    kwargs = {"mode": mode, "max_new_tokens": 8, "block_length": 4}
    monkeypatch.setattr(kernels, "FORCED", "torch")
    reference = models.generate(fixture_model, prompt, **kwargs)
    monkeypatch.setattr(kernels, "FORCED", "triton")
    triton = models.generate(fixture_model, prompt, **kwargs)
    assert triton.tokens == reference.tokens and triton.nfe == reference.nfe
