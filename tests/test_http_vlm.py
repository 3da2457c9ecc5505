"""DP, PT and IM over HTTP with images: a loopback OpenAI-compatible server with a real (tiny,
random-weight) Qwen2-VL answers exactly what the in-process transformers backend answers.

The server (``tests/openai_server.py``) renders and encodes requests with the checkpoint's own
processor and answers ``prompt_logprobs`` in vLLM's response shape, so the client's image parts,
prompt log-prob parsing and answer location run end to end. The same agents then run in process on
the same checkpoint; their scores must agree (float32 CPU: to 1e-4 relative), and the judge's
greedy answers must be the same text.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from visa.agents.answer_likelihood import MutualInformationAgent, PriorTokenPerplexityAgent
from visa.agents.base import ImageItem, SampleItem
from visa.agents.judge import JudgeAgent
from visa.backends.registry import BackendSpec
from visa.samples import Turn
from visa.testing import write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def server(checkpoint):
    import transformers
    from openai_server import VisionLanguageServer

    from visa.backends.architectures import FAMILIES, load_processor

    family = FAMILIES["qwen2_vl"]
    model = getattr(transformers, family.model_class).from_pretrained(str(checkpoint), dtype="float32").eval()
    server = VisionLanguageServer(model, load_processor(str(checkpoint), family))
    server.base_url = server.start()
    yield server
    server.stop()


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [_image(1, (96, 64)), _image(2, (64, 80)), _image(3, (120, 90))]
SAMPLES = [
    SampleItem("a", "a", (Turn("user", "<image>\nWhat is shown?"), Turn("assistant", "Coloured noise."))),
    SampleItem(
        "b",
        "b",
        (
            Turn("user", "Describe the picture.\n<image>"),
            Turn("assistant", "Speckles in red, green and blue."),
            Turn("user", "Anything else?"),
            Turn("assistant", "No, only noise."),
        ),
    ),
    SampleItem("c", "c", (Turn("user", "<image>\nIs there text?"), Turn("assistant", "No text at all."))),
]


def _samples() -> list[SampleItem]:
    return [
        SampleItem(s.key, s.sample_id, s.turns, (image,), (f"k{i}",))
        for i, (s, image) in enumerate(zip(SAMPLES, IMAGES, strict=True))
    ]


def _run(spec: BackendSpec) -> dict[str, list]:
    judge = JudgeAgent(JudgeAgent.Params(backend=spec, max_new_tokens=12, examples=False))
    pt = PriorTokenPerplexityAgent(PriorTokenPerplexityAgent.Params(backend=spec, k=5))
    im = MutualInformationAgent(MutualInformationAgent.Params(backend=spec))
    assert judge.mode == "generate" and not judge.verbalized and pt.uses_images and im.uses_images
    agents = {"dp": judge, "pt": pt, "im": im}
    for agent in agents.values():
        agent.setup()
    try:
        out = {
            "dp": judge.score_batch([ImageItem(f"k{i}", image) for i, image in enumerate(IMAGES)]),
            "pt": pt.score_batch(_samples()),
            "im": im.score_batch(_samples()),
        }
    finally:
        for agent in agents.values():
            agent.teardown()
    for results in out.values():
        for result in results:
            assert not isinstance(result, Exception), result
    return out


@pytest.mark.timeout(300)
def test_dp_pt_im_over_http_with_images_equal_in_process(server, checkpoint):
    seen_before = len(server.images_seen)
    http = _run(BackendSpec(type="openai", params={"base_url": server.base_url, "model": server.name}))
    local = _run(BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu", "batch_size": 1}))

    # The images travelled: one per judged image, two passes (PT; IM with image) per sample.
    assert sorted(server.images_seen[seen_before:]) == sorted([im.size for im in IMAGES] * 3)
    for score in ("pt", "im"):
        for field in ("score",) + (("ce_image", "ce_text") if score == "im" else ()):
            over_http = np.array([r[field] for r in http[score]], dtype=float)
            in_process = np.array([r[field] for r in local[score]], dtype=float)
            assert np.all(np.isfinite(over_http))
            np.testing.assert_allclose(over_http, in_process, rtol=1e-4, atol=1e-5, err_msg=f"{score}.{field}")
    assert [r["tokens"] for r in http["pt"]] == [r["tokens"] for r in local["pt"]]
    assert [r["tokens"] for r in http["im"]] == [r["tokens"] for r in local["im"]]
    # The image matters to the model: with and without it the answers' cross-entropy differs.
    assert all(abs(r["score"]) > 1e-6 for r in http["im"])
    # DP: the same greedy judgement, read the same way.
    assert [r["raw"] for r in http["dp"]] == [r["raw"] for r in local["dp"]]
    assert [r["score"] for r in http["dp"]] == [r["score"] for r in local["dp"]]
    assert all(r["raw"] for r in http["dp"])
