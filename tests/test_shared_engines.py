"""One engine per backend spec and process: DP, PT and IM of one model load it once.

The agents run on a tiny random-weight Qwen2-VL checkpoint through the real transformers backend.
Their scores with one shared engine must equal their scores with one engine each (three loads of the
same files), and the shared engine must be set up once and torn down after the last agent lets go.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from visa.agents.answer_likelihood import MutualInformationAgent, PriorTokenPerplexityAgent
from visa.agents.base import ImageItem, SampleItem
from visa.agents.judge import JudgeAgent
from visa.backends import shared
from visa.backends.registry import BackendSpec, build_backend
from visa.samples import Turn
from visa.testing import write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def _agents(spec: BackendSpec, backends=(None, None, None)):
    judge = JudgeAgent(JudgeAgent.Params(backend=spec, mode="likelihood", examples=False), backend=backends[0])
    pt = PriorTokenPerplexityAgent(PriorTokenPerplexityAgent.Params(backend=spec, k=4), backend=backends[1])
    im = MutualInformationAgent(MutualInformationAgent.Params(backend=spec), backend=backends[2])
    return judge, pt, im


def _score(judge, pt, im):
    images = [_image(1), _image(2)]
    samples = [
        SampleItem(f"s{i}", f"s{i}", (Turn("user", "<image>\nWhat is shown?"), Turn("assistant", text)), (image,), (f"k{i}",))
        for i, (image, text) in enumerate(zip(images, ["Noise in many colours.", "A random pattern."], strict=True))
    ]
    results = [
        judge.score_batch([ImageItem(f"k{i}", image) for i, image in enumerate(images)]),
        pt.score_batch(samples),
        im.score_batch(samples),
    ]
    for batch in results:
        for result in batch:
            assert not isinstance(result, Exception), result
    return [[r["score"] for r in batch] for batch in results]


def test_three_agents_on_one_spec_load_one_model(checkpoint):
    spec = BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu"})
    # Written differently (a default spelled out), meaning the same engine.
    spec_b = BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu", "dtype": "auto"})
    assert spec.engine_key() == spec_b.engine_key()
    key = spec.engine_key()
    setups_before = shared.ENGINES.setups.get(key, 0)

    judge, pt, im = _agents(spec)
    pt.params = pt.params.model_copy(update={"backend": spec_b})
    for agent in (judge, pt, im):
        agent.setup()
    assert shared.ENGINES.setups[key] - setups_before == 1
    assert shared.ENGINES.loaded()[key] == 3
    assert judge.backend is pt.backend is im.backend
    shared_scores = _score(judge, pt, im)

    for agent, left in ((judge, 2), (pt, 1)):
        agent.teardown()
        assert shared.ENGINES.loaded()[key] == left
    model = im.backend.model
    assert model is not None
    im.teardown()
    assert key not in shared.ENGINES.loaded()

    # Three engines, one per agent, from the same files: the same scores.
    own = [build_backend(spec) for _ in range(3)]
    for backend in own:
        backend.setup()
    assert own[0].model is not own[1].model
    separate_scores = _score(*_agents(spec, own))
    np.testing.assert_allclose(np.array(shared_scores, dtype=float), np.array(separate_scores, dtype=float), rtol=1e-6)


def test_different_engine_options_do_not_share(checkpoint):
    a = BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu"})
    b = BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu", "dtype": "bfloat16"})
    assert a.engine_key() != b.engine_key()
    first, second = shared.acquire(a), shared.acquire(b)
    try:
        assert first is not second
    finally:
        shared.release(first)
        shared.release(second)


def test_failed_setup_is_not_cached(tmp_path):
    spec = BackendSpec(type="transformers", params={"model": str(tmp_path / "absent"), "device": "cpu"})
    for _ in range(2):  # each acquire tries again and fails the same way
        with pytest.raises(OSError):
            shared.acquire(spec)
    assert spec.engine_key() not in shared.ENGINES.loaded()


def test_release_of_a_foreign_backend_is_refused(checkpoint):
    backend = build_backend(BackendSpec(type="transformers", params={"model": str(checkpoint), "device": "cpu"}))
    with pytest.raises(ValueError, match="did not hand out"):
        shared.release(backend)
