"""SAM 2's generator steps as the reference defines them, on hand-built data and a tiny random model.

The reference behaviours checked here (SAM 2's ``SAM2AutomaticMaskGenerator`` / ``SAM2Transforms``):
crops column by column; holes and sprinkles filled on the low-resolution logits at threshold 0
(components of at most the given area, 8-connectivity, set to +10 / -10) before upsampling; the
mask prompt of the m2m refinement clamped to +-32; quality tests skipped when their threshold is 0;
no full-resolution small-region pass unless asked for. ``benchmarks/sam2_fidelity.py`` compares whole
mask sets with the ``sam2`` package itself.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visa.agents.sam2 import (  # noqa: E402
    Sam2Agent,
    Sam2Params,
    _component_areas_torch,
    component_areas,
    crop_boxes,
    fill_holes_and_sprinkles,
    stability_score,
)


def test_crops_go_column_by_column():
    boxes = [b for b, layer in crop_boxes(1000, 600, 1, 0.3) if layer == 1]
    x0s = [b[0] for b in boxes]
    y0s = [b[1] for b in boxes]
    assert x0s[0] == x0s[1] < x0s[2] == x0s[3]  # the first column first
    assert y0s[0] == y0s[2] < y0s[1] == y0s[3]


def _blobs(seed: int, shape=(3, 40, 50)) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random(shape) > 0.6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_areas_scipy_and_torch_agree(seed):
    binary = _blobs(seed)
    areas = component_areas(binary)
    assert torch.equal(areas, _component_areas_torch(binary))
    assert torch.all((areas > 0) == binary)
    # Two pixels that touch only at a corner are one component (8-connectivity).
    diagonal = torch.zeros(1, 4, 4, dtype=torch.bool)
    diagonal[0, 0, 0] = diagonal[0, 1, 1] = True
    assert component_areas(diagonal)[0, 0, 0] == 2 == _component_areas_torch(diagonal)[0, 1, 1]


def test_fill_holes_and_sprinkles_on_low_res_logits():
    logits = torch.full((1, 12, 12), -5.0)
    logits[0, 2:10, 2:10] = 5.0  # a square of 64 pixels
    logits[0, 5, 5] = -3.0  # a one-pixel hole
    logits[0, 5:7, 7] = -2.0  # a two-pixel hole
    logits[0, 0, 11] = 4.0  # a one-pixel sprinkle outside
    filled = fill_holes_and_sprinkles(logits, max_area=2)
    assert filled[0, 5, 5] == 10.0 and torch.all(filled[0, 5:7, 7] == 10.0)  # holes <= 2 pixels: +10
    assert filled[0, 0, 11] == -10.0  # sprinkle: -10
    assert filled[0, 2, 2] == 5.0 and filled[0, 0, 0] == -5.0  # everything else untouched
    assert torch.equal(fill_holes_and_sprinkles(logits, max_area=0), logits)
    one = fill_holes_and_sprinkles(logits, max_area=1)
    assert one[0, 5, 5] == 10.0 and torch.all(one[0, 5:7, 7] == -2.0)  # "at most": 2 > 1 stays


def test_sprinkles_are_labelled_on_the_logits_before_the_holes_are_filled():
    logits = torch.full((1, 7, 7), 5.0)
    logits[0, 2:5, 2:5] = -5.0  # an 8-pixel ring of background...
    logits[0, 3, 3] = 5.0  # ...around a one-pixel island
    filled = fill_holes_and_sprinkles(logits, max_area=8)
    ring = filled[0, 2:5, 2:5].clone()
    assert filled[0, 3, 3] == -10.0  # an island of the decoder's logits, even though its hole is filled
    ring[1, 1] = 10.0
    assert torch.all(ring == 10.0)


def test_stability_score_is_float32_and_nan_when_empty():
    logits = torch.full((2, 5, 5), -9.0)
    logits[0, 1:4, 1:4] = 9.0
    score = stability_score(logits, 0.5, 0.7)
    assert score.dtype == torch.float32
    assert score[0] == 1.0 and torch.isnan(score[1])
    assert not bool(score[1] >= 0.0)  # no threshold keeps an empty mask


@pytest.fixture(scope="module")
def sam():
    from transformers import Sam2Model

    from visa.agents.sam2 import sam2_config

    torch.manual_seed(0)
    model = Sam2Model(sam2_config(tiny=True)).eval()
    with torch.no_grad():  # spatially varied random masks with logits far beyond +-32
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(1e6)
    return model


def _photo():
    from PIL import Image

    rng = np.random.default_rng(3)
    array = np.zeros((96, 128, 3), dtype=np.uint8)
    array[:, :64] = (200, 40, 40)
    array[30:80, 70:120] = (30, 160, 60)
    return Image.fromarray(np.clip(array + rng.integers(0, 30, array.shape), 0, 255).astype(np.uint8))


def test_m2m_mask_prompt_is_clamped_and_no_extra_pass_by_default(sam, monkeypatch):
    params = Sam2Params(device="cpu", points_per_side=2, crop_n_layers=0, reference_resize=False,
                        pred_iou_thresh=0.0, stability_score_thresh=0.0)
    agent = Sam2Agent.from_model(sam, params)
    seen: list[float] = []
    raw: list[float] = []
    decode = agent._decode

    def spy(embeddings, points, masks=None):
        out = decode(embeddings, points, masks)
        (seen if masks is not None else raw).append(float(masks.abs().max()) if masks is not None else float(out[0].abs().max()))
        return out

    monkeypatch.setattr(agent, "_decode", spy)
    records, _ = agent.generate(_photo())
    assert max(raw) > 32  # the decoder's own logits go beyond the clamp...
    assert seen and max(seen) <= 32.0  # ...the refinement prompt does not
    # Thresholds at 0 switch the tests off, as in the reference: every decoded mask reaches NMS.
    assert len(records) >= 1

    cleaned = []
    import visa.agents.sam2 as module

    monkeypatch.setattr(module, "clean_small_regions", lambda *a: cleaned.append(1) or (a[0], True))
    agent.generate(_photo())
    assert not cleaned  # SAM-v1 small-region removal is off by default
    Sam2Agent.from_model(sam, params.model_copy(update={"postprocess_small_regions": True})).generate(_photo())
    assert cleaned
