"""Request building and output reading of the vLLM backend, without vLLM.

vLLM expands each image placeholder with the model's Hugging Face processor; here the tiny
checkpoints' processors do the same expansion, standing in for the engine. The byte-level
tokenizer gives one token per UTF-8 byte, so answer positions are known independently.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from visa.agents.base import MissingDependency
from visa.backends.architectures import FAMILIES, load_processor
from visa.backends.base import AnswerLogprobsRequest, AnswerLogprobsResult, GenerateRequest, Message
from visa.backends.registry import BackendSpec, build_backend
from visa.backends.transformers_vlm import TransformersVLMBackend
from visa.backends.vllm_engine import (
    AlignmentError,
    VLLMBackend,
    VLLMPrompt,
    answer_logprobs_from_output,
    build_generate_prompt,
    build_logprobs_prompt,
)
from visa.samples import Turn
from visa.testing import write_random_checkpoint

CONV = (
    Turn("user", "<image>\nWhat is shown?"),
    Turn("assistant", "Three apples."),
    Turn("user", "And the colour?"),
    Turn("assistant", "Green — très vert."),
)


def _image(seed: int, size=(90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["qwen2_vl", "internvl", "llava_onevision"])
def family_processor(request, tmp_path_factory):
    path = write_random_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, load_processor(str(path), FAMILIES[request.param])


def _render(processor):
    return lambda messages, **kwargs: processor.apply_chat_template(messages, tokenize=False, **kwargs)


def _engine_tokens(processor, prompt: VLLMPrompt, bos: int | None = None) -> list[int]:
    """What vLLM's ``prompt_token_ids`` would be: the processor's placeholder expansion."""
    images = [list(prompt.images)] if prompt.images else None
    ids = processor(text=[prompt.prompt], images=images, add_special_tokens=False)["input_ids"][0]
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    return ([bos] if bos is not None else []) + ids


def _find(sequence: list[int], part: list[int], after: int = 0) -> int:
    return next(s for s in range(after, len(sequence) - len(part) + 1) if sequence[s : s + len(part)] == part)


def test_logprobs_prompt_places_images_and_finds_answers(family_processor):
    family, _, processor = family_processor
    tokenizer = processor.tokenizer
    for images in ((_image(0),), ()):
        prompt = build_logprobs_prompt(
            AnswerLogprobsRequest(CONV, images),
            _render(processor),
            tokenizer,
            placeholders=(processor.image_token,),
        )
        assert prompt.prompt.count(processor.image_token) == len(images)
        assert "<image>\nWhat" not in prompt.prompt or family == "llava_onevision" and images
        assert len(prompt.answers) == 2
        for turn, answer in zip(prompt.answers, (CONV[1].text, CONV[3].text), strict=True):
            assert len(turn) == len(answer.encode())
            assert list(turn) == list(range(turn[0], turn[0] + len(turn)))  # contiguous
            assert tokenizer.decode([prompt.token_ids[i] for i in turn]) == answer
        engine = prompt.engine_input()
        assert engine["prompt"] == prompt.prompt
        if images:
            assert engine["multi_modal_data"]["image"][0].size == images[0].size
        else:
            assert "multi_modal_data" not in engine


@pytest.mark.parametrize("bos", [None, 7])
def test_answer_logprobs_read_from_engine_positions(family_processor, bos):
    _, _, processor = family_processor
    prompt = build_logprobs_prompt(
        AnswerLogprobsRequest(CONV, (_image(1),)), _render(processor), processor.tokenizer
    )
    theirs = _engine_tokens(processor, prompt, bos)
    assert len(theirs) > len(prompt.token_ids)  # the image was expanded
    # Position j carries log-prob -j/1000 for the actual token, and a decoy for another token.
    logprobs = [None] + [
        {theirs[j]: SimpleNamespace(logprob=-j / 1000), (theirs[j] + 1) % 200: SimpleNamespace(logprob=-50.0)}
        for j in range(1, len(theirs))
    ]
    result = answer_logprobs_from_output(prompt, theirs, logprobs)
    cursor = 0
    for values, answer in zip(result.per_turn, (CONV[1].text, CONV[3].text), strict=True):
        ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        start = _find(theirs, ids, cursor)
        np.testing.assert_allclose(values, -np.arange(start, start + len(ids)) / 1000, atol=1e-7)
        cursor = start + len(ids)
    # Dict-shaped entries (the HTTP format) read the same.
    as_dicts = [None] + [{k: {"logprob": v.logprob} for k, v in e.items()} for e in logprobs[1:]]
    again = answer_logprobs_from_output(prompt, theirs, as_dicts)
    for x, y in zip(result.per_turn, again.per_turn, strict=True):
        np.testing.assert_array_equal(x, y)


def test_misaligned_engine_tokens_are_an_error(family_processor):
    _, _, processor = family_processor
    prompt = build_logprobs_prompt(AnswerLogprobsRequest(CONV), _render(processor), processor.tokenizer)
    theirs = _engine_tokens(processor, prompt)
    logprobs = [None] + [{t: -1.0} for t in theirs[1:]]
    changed = list(theirs)
    changed[-3] = (changed[-3] + 1) % 200
    with pytest.raises(AlignmentError, match="differ from the local tokenisation"):
        answer_logprobs_from_output(prompt, changed, logprobs)
    with pytest.raises(AlignmentError, match="prompt log-probs for"):
        answer_logprobs_from_output(prompt, theirs, logprobs[:-1])
    missing = list(logprobs)
    missing[-4] = {theirs[-4] + 1: -1.0}
    with pytest.raises(AlignmentError, match="no log-prob"):
        answer_logprobs_from_output(prompt, theirs, missing)


def test_generate_prompt(family_processor):
    _, _, processor = family_processor
    request = GenerateRequest(
        (
            Message("system", "Rate images."),
            Message("user", "Example", (_image(2),)),
            Message("assistant", "Final score: 4"),
            Message("user", "This one", (_image(3), _image(4))),
        ),
        max_new_tokens=16,
    )
    prompt = build_generate_prompt(request, _render(processor), max_image_pixels=1000)
    assert len(prompt.images) == 3 and all(i.width * i.height <= 1000 for i in prompt.images)
    assert prompt.prompt.count(processor.image_token) == 3
    assert prompt.prompt.rstrip().endswith("assistant")
    assert prompt.answers == ()
    with pytest.raises(ValueError, match="at least one message"):
        build_generate_prompt(GenerateRequest(()), _render(processor))
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_generate_prompt(GenerateRequest((Message("user", "x"),), max_new_tokens=0), _render(processor))


# -- the backend over an in-process stand-in for vllm.LLM ------------------------------------------


class _StandInLLM:
    """Answers ``LLM.generate`` like vLLM does, computing with the tiny transformers model."""

    def __init__(self, reference: TransformersVLMBackend):
        self.reference = reference
        self.calls = 0

    def generate(self, inputs, params, use_tqdm=False):
        import torch

        self.calls += 1
        processor, model = self.reference.processor, self.reference.model
        outputs = []
        for item, sampling in zip(inputs, params, strict=True):
            if "BOOM" in item["prompt"]:
                raise RuntimeError("engine rejected the prompt")
            images = item.get("multi_modal_data", {}).get("image")
            encoding = processor(
                text=[item["prompt"]],
                images=[images] if images else None,
                return_tensors="pt",
                add_special_tokens=False,
            )
            encoding.pop("text_replacement_offsets", None)
            ids = encoding["input_ids"][0].tolist()
            if sampling["prompt_logprobs"] is not None:
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(**encoding).logits[0].float(), dim=-1)
                prompt_logprobs = [None] + [
                    {ids[j]: SimpleNamespace(logprob=float(logprobs[j - 1, ids[j]]))}
                    for j in range(1, len(ids))
                ]
                outputs.append(
                    SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=[])
                )
            else:
                text = self.reference.generate(
                    [GenerateRequest((Message("user", "unused"),), max_new_tokens=sampling["max_tokens"])]
                )[0].text
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return outputs


def _sampling(temperature=1.0, max_tokens=16, prompt_logprobs=None, **_):
    return {"temperature": temperature, "max_tokens": max_tokens, "prompt_logprobs": prompt_logprobs}


def test_backend_matches_transformers_and_isolates_failures(tmp_path):
    path = write_random_checkpoint("qwen2_vl", tmp_path / "q")
    reference = TransformersVLMBackend(TransformersVLMBackend.Params(model=str(path), device="cpu"))
    reference.setup()
    backend = VLLMBackend(VLLMBackend.Params(model=str(path), chunk_size=3))
    backend.llm, backend.processor, backend._sampling = _StandInLLM(reference), reference.processor, _sampling
    requests = [
        AnswerLogprobsRequest(CONV, (_image(5),)),
        AnswerLogprobsRequest(CONV),
        AnswerLogprobsRequest((Turn("user", "BOOM"), Turn("assistant", "x"))),
        AnswerLogprobsRequest((Turn("user", "only a question"),)),
        AnswerLogprobsRequest((Turn("user", "Hi"), Turn("assistant", "Hello!")), (_image(6),)),
    ]
    got = backend.answer_logprobs(requests)
    want = reference.answer_logprobs(requests)
    assert isinstance(got[2], RuntimeError) and "engine rejected" in str(got[2])
    assert isinstance(got[3], ValueError)
    for i in (0, 1, 4):
        assert isinstance(got[i], AnswerLogprobsResult)
        for x, y in zip(got[i].per_turn, want[i].per_turn, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4)
    texts = backend.generate(
        [GenerateRequest((Message("user", "Rate", (_image(1),)),), max_new_tokens=4), GenerateRequest(())]
    )
    assert isinstance(texts[0].text, str) and isinstance(texts[1], ValueError)


def test_params_and_missing_dependency():
    backend = build_backend(
        BackendSpec(type="vllm", params={"model": "Qwen/Qwen2-VL-2B-Instruct", "tensor_parallel_size": 2})
    )
    assert isinstance(backend, VLLMBackend)
    assert backend.params.enable_prefix_caching is True
    assert backend.models() == {"Qwen/Qwen2-VL-2B-Instruct": "unpinned"}
    with pytest.raises(ValueError):
        build_backend(BackendSpec(type="vllm", params={"model": "m", "tensor_parallel_size": 0}))
    with pytest.raises(RuntimeError, match="setup"):
        backend.generate([GenerateRequest((Message("user", "x"),))])
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(MissingDependency, match=r"visa\[vllm\]"):
            backend.setup()
