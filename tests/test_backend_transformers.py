"""The transformers VLM backend on tiny random-weight checkpoints of every supported family.

The checkpoints use a byte-level tokenizer (one token per UTF-8 byte), so the expected answer tokens
are known independently of the backend: an answer of n bytes has exactly n scored tokens, and their
reference log-probs come from the model's full logits at the place where those bytes sit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from visa.backends.architectures import (
    FAMILIES,
    AlignmentError,
    UnsupportedModel,
    align_tail,
    chat_messages,
    clean_text,
    fit_pixels,
)
from visa.backends.base import AnswerLogprobsRequest, AnswerLogprobsResult, GenerateRequest, Message
from visa.backends.registry import BackendSpec, build_backend
from visa.backends.transformers_vlm import RequestTooLong, TransformersVLMBackend
from visa.samples import Turn
from visa.testing import write_random_checkpoint

FAMILY_NAMES = list(FAMILIES)


def _image(seed: int, size: tuple[int, int] = (150, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


CAT = (
    Turn("user", "<image>\nWhat is in the picture?"),
    Turn("assistant", "A cat on a mat."),
    Turn("user", "What colour is it?"),
    Turn("assistant", "Orange, with white paws. Très mignon."),
)
SHORT = (Turn("user", "Describe it."), Turn("assistant", "Two red blocks"))


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def backend(request, tmp_path_factory):
    path = write_random_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    b = TransformersVLMBackend(TransformersVLMBackend.Params(model=str(path), batch_size=4, device="cpu"))
    b.setup()
    yield b
    b.teardown()


def _variant(backend: TransformersVLMBackend, **params) -> TransformersVLMBackend:
    """The same loaded model behind other parameters."""
    merged = {**backend.params.model_dump(), **params}
    return TransformersVLMBackend.from_loaded(backend.model, backend.processor, **merged)


def _reference(backend: TransformersVLMBackend, turns, images) -> list[np.ndarray]:
    """Answer log-probs from the model's full logits, locating answers by their bytes."""
    import torch

    roles = [t.role for t in turns]
    first_user = roles.index("user")
    messages = chat_messages(
        [(t.role, t.text, len(images) if i == first_user and images else 0) for i, t in enumerate(turns)]
    )
    text = backend.processor.apply_chat_template(messages, tokenize=False)
    encoding = backend.processor(
        text=[text], images=[list(images)] if images else None, return_tensors="pt", add_special_tokens=False
    )
    encoding.pop("text_replacement_offsets", None)
    with torch.no_grad():
        logprobs = torch.log_softmax(backend.model(**encoding).logits[0].float(), dim=-1)
    ids = encoding["input_ids"][0].tolist()
    tokenizer = backend.processor.tokenizer
    result, cursor = [], 0
    for turn in turns:
        if turn.role != "assistant":
            continue
        answer = tokenizer(turn.text, add_special_tokens=False)["input_ids"]
        assert len(answer) == len(turn.text.encode())  # one token per byte
        start = next(
            s for s in range(cursor, len(ids) - len(answer) + 1) if ids[s : s + len(answer)] == answer
        )
        result.append(np.array([float(logprobs[start + j - 1, answer[j]]) for j in range(len(answer))]))
        cursor = start + len(answer)
    return result


def _check(result, expected_lengths):
    assert isinstance(result, AnswerLogprobsResult), result
    assert [len(x) for x in result.per_turn] == expected_lengths
    for values in result.per_turn:
        assert np.all(np.isfinite(values)) and np.all(values <= 0)


def test_answer_tokens_are_exactly_the_answers_and_match_full_logits(backend):
    image = fit_pixels(_image(0), backend.params.max_image_pixels)
    for images in ((image,), ()):
        [result] = backend.answer_logprobs([AnswerLogprobsRequest(CAT, images)])
        _check(result, [len(CAT[1].text.encode()), len(CAT[3].text.encode())])
        expected = _reference(backend, CAT, images)
        for got, want in zip(result.per_turn, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_image_changes_the_answer_logprobs(backend):
    with_image, without = backend.answer_logprobs(
        [AnswerLogprobsRequest(CAT, (_image(0),)), AnswerLogprobsRequest(CAT)]
    )
    assert not np.allclose(with_image.per_turn[0], without.per_turn[0], atol=1e-6)
    # Later answers see the image through attention too.
    assert not np.allclose(with_image.per_turn[1], without.per_turn[1], atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_one_at_a_time(backend, padding_side):
    b = _variant(backend, padding_side=padding_side)
    requests = [
        AnswerLogprobsRequest(CAT, (_image(1),)),
        AnswerLogprobsRequest(SHORT, (_image(2, (40, 90)),)),
        AnswerLogprobsRequest(CAT),
        AnswerLogprobsRequest(SHORT),
        AnswerLogprobsRequest(SHORT, (_image(3, (300, 60)),)),
    ]
    batched = b.answer_logprobs(requests)
    for request, together in zip(requests, batched, strict=True):
        [alone] = b.answer_logprobs([request])
        assert isinstance(together, AnswerLogprobsResult), together
        for x, y in zip(together.per_turn, alone.per_turn, strict=True):
            np.testing.assert_allclose(x, y, atol=2e-5)


def test_image_markers_in_text_are_ignored(backend):
    plain = (Turn("user", "What is in the picture?"), *CAT[1:])
    a, b = backend.answer_logprobs(
        [AnswerLogprobsRequest(CAT, (_image(0),)), AnswerLogprobsRequest(plain, (_image(0),))]
    )
    for x, y in zip(a.per_turn, b.per_turn, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_failing_requests_become_exceptions_in_place(backend):
    requests = [
        AnswerLogprobsRequest(SHORT, (_image(1),)),
        AnswerLogprobsRequest((Turn("user", "no answer here"),)),  # nothing to score
        AnswerLogprobsRequest((Turn("assistant", "hello"),), (_image(1),)),  # no user turn for the image
        AnswerLogprobsRequest(CAT, (_image(2),)),
        AnswerLogprobsRequest(SHORT),
    ]
    results = backend.answer_logprobs(requests)
    assert isinstance(results[1], ValueError) and "no assistant turn" in str(results[1])
    assert isinstance(results[2], ValueError) and "no user turn" in str(results[2])
    _check(results[0], [len(SHORT[1].text)])
    _check(results[3], [len(CAT[1].text.encode()), len(CAT[3].text.encode())])
    _check(results[4], [len(SHORT[1].text)])


def test_a_request_that_breaks_the_processor_fails_alone(backend):
    """A request failing inside the batched forward is isolated; its batch-mates still get results."""
    long_text = (Turn("user", "x" * 600), Turn("assistant", "ok"))
    b = _variant(backend, max_length=400)
    results = b.answer_logprobs(
        [AnswerLogprobsRequest(SHORT), AnswerLogprobsRequest(long_text), AnswerLogprobsRequest(CAT)]
    )
    assert isinstance(results[1], RequestTooLong)
    _check(results[0], [len(SHORT[1].text)])
    _check(results[2], [len(CAT[1].text.encode()), len(CAT[3].text.encode())])


def test_empty_answer_gives_an_empty_array(backend):
    turns = (
        Turn("user", "Say nothing."),
        Turn("assistant", ""),
        Turn("user", "Now talk."),
        Turn("assistant", "Hi"),
    )
    [result] = backend.answer_logprobs([AnswerLogprobsRequest(turns)])
    _check(result, [0, 2])


def test_generate_is_greedy_batched_and_bounded(backend):
    few_shot = GenerateRequest(
        (
            Message("system", "Rate images from 1 to 5."),
            Message("user", "Example:", (_image(4),)),
            Message("assistant", "Final score: 3"),
            Message("user", "Now this one:", (_image(5, (60, 80)),)),
        ),
        max_new_tokens=6,
    )
    requests = [
        GenerateRequest((Message("user", "Rate it.", (_image(1),)),), max_new_tokens=5),
        GenerateRequest((Message("user", "Hello there"),), max_new_tokens=8),
        few_shot,
        GenerateRequest((Message("user", "Rate this.", (_image(2, (40, 90)),)),), max_new_tokens=3),
        GenerateRequest((), max_new_tokens=3),
    ]
    results = backend.generate(requests)
    assert isinstance(results[4], ValueError)
    for request, together in zip(requests[:4], results[:4], strict=True):
        [alone] = backend.generate([request])
        assert together.text == alone.text
        assert isinstance(together.text, str)
        # One token per byte: the decoded text cannot be longer than the token budget.
        assert len(together.text.encode("utf-8", "surrogatepass")) <= 3 * request.max_new_tokens
    again = backend.generate(requests[:4])
    assert [r.text for r in again] == [r.text for r in results[:4]]


def test_models_and_params():
    spec = BackendSpec(type="transformers", params={"model": "/nowhere", "batch_size": 2})
    b = build_backend(spec)
    assert isinstance(b, TransformersVLMBackend)
    assert b.models() == {"/nowhere": "unpinned"}
    assert b.params.trust_remote_code is False
    with pytest.raises(ValueError):
        build_backend(BackendSpec(type="transformers", params={"model": "m", "batch_sise": 2}))
    with pytest.raises(ValueError):
        build_backend(BackendSpec(type="transformers", params={"model": "m", "dtype": "int3"}))
    with pytest.raises(RuntimeError, match="setup"):
        b.answer_logprobs([AnswerLogprobsRequest(SHORT)])


def test_unsupported_family_is_a_clear_error(tmp_path):
    path = write_random_checkpoint("qwen2_vl", tmp_path / "q")
    b = TransformersVLMBackend(TransformersVLMBackend.Params(model=str(path), family="blip"))
    with pytest.raises(UnsupportedModel, match="unknown model family 'blip'"):
        b.setup()


# -- pure helpers ---------------------------------------------------------------------------------


def test_clean_text_strips_llava_markers():
    assert clean_text("<image>\nWhat is it?") == "What is it?"
    assert clean_text("What is it?\n<image>") == "What is it?"
    assert clean_text("Look <|image_pad|> here", ["<|image_pad|>"]) == "Look  here"
    assert clean_text("  keep spacing  ") == "  keep spacing  "


def test_chat_messages_layout_and_errors():
    messages = chat_messages([("user", "<image>\nHi", 2), ("assistant", "Yo", 0)])
    assert messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}
    with pytest.raises(ValueError, match="only be attached to user"):
        chat_messages([("assistant", "x", 1)])
    with pytest.raises(ValueError, match="unknown role"):
        chat_messages([("tool", "x", 0)])


def test_align_tail_maps_answers_past_expanded_images():
    ours = [1, 2, 9, 3, 4, 5, 6]  # 9: one image placeholder
    theirs = [0, 1, 2, 9, 9, 9, 9, 3, 4, 5, 6]  # BOS added, placeholder expanded to 4
    assert align_tail(ours, theirs, [[4], [5, 6], []]) == [[8], [9, 10], []]
    assert align_tail(ours, theirs, [[], []]) == [[], []]
    with pytest.raises(AlignmentError):
        align_tail(ours, [0, 1, 2, 9, 9, 3, 4, 7, 6], [[4], [5, 6]])
    with pytest.raises(AlignmentError):
        align_tail(ours, ours[:-1], [[4]])


def test_fit_pixels_caps_area_and_keeps_aspect():
    image = _image(0, (1000, 500))
    small = fit_pixels(image, 20_000)
    assert small.width * small.height <= 20_000
    assert math.isclose(small.width / small.height, 2.0, rel_tol=0.05)
    assert fit_pixels(image, None) is image
    assert fit_pixels(image.convert("L"), None).mode == "RGB"
