"""bfloat16 matrix products of the embedded language model: what is converted, and how far results move."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_language_agents import CHATML_TEMPLATE, CONVERSATION, build_tokenizer, tiny_model

from visa.backends.base import AnswerLogprobsRequest
from visa.backends.cpu_precision import Bf16Linear, bf16_head_logprobs, native_bf16, resolve_precision
from visa.backends.embedded_lm import EmbeddedLMBackend
from visa.samples import Turn


def test_bf16_linear_matches_a_bfloat16_product_computed_by_hand() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24, bias=True)
    x = torch.randn(5, 48)
    converted = Bf16Linear(linear)
    got = converted(x)
    assert got.dtype == torch.float32 and converted.weight.dtype == torch.bfloat16
    w, b = linear.weight.detach().to(torch.bfloat16).float(), linear.bias.detach().to(torch.bfloat16).float()
    by_hand = x.to(torch.bfloat16).float() @ w.T + b  # bfloat16 inputs, float32 accumulation
    np.testing.assert_allclose(got.detach().numpy(), by_hand.numpy(), rtol=1e-2, atol=1e-2)
    exact = linear(x).detach().numpy()
    assert 0 < np.abs(got.detach().numpy() - exact).max() < 0.05  # rounded, but only just


def _float32_logprobs(hidden, weight, tokens):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def test_bf16_head_is_float32_where_it_recomputes_and_close_elsewhere() -> None:
    torch.manual_seed(1)
    hidden, tokens = torch.randn(300, 64) * 2, torch.randint(0, 2000, (300,))
    weight = torch.randn(2000, 64) * 0.5
    exact = _float32_logprobs(hidden, weight, tokens)
    # every logit recomputed in float32 (vocabulary smaller than exact_top): the float32 result
    small = weight[:40]
    got = bf16_head_logprobs(hidden, small, small.to(torch.bfloat16), tokens % 40, exact_top=40)
    np.testing.assert_allclose(got.numpy(), _float32_logprobs(hidden, small, tokens % 40).numpy(), atol=1e-5)
    # the usual case: only the tail of the normaliser keeps bfloat16 rounding
    got = bf16_head_logprobs(hidden, weight, weight.to(torch.bfloat16), tokens)
    plain = torch.log_softmax((hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float(), -1)
    plain = plain.gather(1, tokens.unsqueeze(1)).squeeze(1)
    error, plain_error = (got - exact).abs(), (plain - exact).abs()
    assert error.max() < 0.05 and error.mean() < 0.005
    assert error.mean() < plain_error.mean() / 3  # far closer than a bfloat16 head alone


def test_auto_precision_follows_the_cpu() -> None:
    assert resolve_precision("auto") == ("bfloat16" if native_bf16() else "float32")
    assert resolve_precision("float32") == "float32" and resolve_precision("bfloat16") == "bfloat16"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_tokenizer(CHATML_TEMPLATE)
    tiny_model(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _backend(folder, precision: str) -> EmbeddedLMBackend:
    backend = EmbeddedLMBackend(EmbeddedLMBackend.Params(model_dir=str(folder), precision=precision, memo_size=0))
    backend.setup()
    return backend


def test_bfloat16_backend_converts_the_body_only_and_stays_close(model_dir) -> None:
    exact, fast = _backend(model_dir, "float32"), _backend(model_dir, "bfloat16")
    try:
        body = getattr(fast.model, fast.model.base_model_prefix)
        kinds = {type(m).__name__ for m in body.modules()}
        assert "Bf16Linear" in kinds and "Linear" not in kinds
        head = fast.model.get_output_embeddings()
        assert type(head).__name__ == "Linear" and head.weight.dtype == torch.float32
        assert fast._loaded.head_bf16.dtype == torch.bfloat16 and exact._loaded.head_bf16 is None
        assert exact.model is not fast.model  # one shared model per file *and* precision
        assert "bfloat16 matmuls" in next(iter(fast.models().values()))
        assert "float32 matmuls" in next(iter(exact.models().values()))
        requests = [
            AnswerLogprobsRequest(CONVERSATION),
            AnswerLogprobsRequest((Turn("user", "what animal is on the sofa ?"), Turn("assistant", "a tabby cat ."))),
        ]
        for a, b in zip(exact.answer_logprobs(requests), fast.answer_logprobs(requests), strict=True):
            x, y = np.concatenate(a.per_turn), np.concatenate(b.per_turn)
            assert x.shape == y.shape and np.all(np.isfinite(y))
            assert np.abs(x - y).max() < 0.05 and abs(x.mean() - y.mean()) < 0.01
            assert not np.array_equal(x, y)  # the conversion really happened
    finally:
        exact.teardown()
        fast.teardown()
