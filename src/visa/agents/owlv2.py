"""OWLv2 over the tag vocabulary: a second open-vocabulary detector for OA.

OWLv2 scores every image patch box against every text query in one pass, so there is no prompt
packing: the text embeddings of the whole vocabulary (``text_template`` filled with each tag) are
computed once per worker in ``setup`` and kept; each image is encoded once and compared with all of
them.

Post-processing **[our choice]** (OWLv2 is not part of the reference procedure): each patch box takes
its best-scoring tag (the usual OWL-ViT/OWLv2 post-processing); it is a detection when that score >
``score_threshold`` and the box covers less than ``max_box_area`` of the image; same-label boxes are
then merged by NMS at ``iou_threshold`` (0.5: OWLv2 predicts one box per patch, so one object gets
many overlapping boxes, which the 0.9 of the Grounding DINO procedure would count several times).
Outputs and the TF-IDF ``score`` are those of the Grounding DINO agent.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, MissingDependency, Resources
from visa.agents.grounding_dino import (
    Detection,
    DetectorAgent,
    dedup_same_label,
    device_resources,
    resolve_device,
)
from visa.agents.vocabulary import load_tags


class Owlv2Params(AgentParams):
    batch_size: int = 1
    model_id: str = "google/owlv2-base-patch16-ensemble"
    revision: str = "main"
    tags: str = Field("bundled", description="tag file, or 'bundled' for the packaged 1,886-tag vocabulary")
    text_template: str = Field("a photo of a {}", description="query text; '{}' is replaced by the tag")
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_box_area: float = Field(0.95, gt=0.0, le=1.0)
    iou_threshold: float = Field(0.5, ge=0.0, le=1.0)
    reference_resize: bool = True
    text_batch_size: int = Field(256, ge=1, description="queries per text-encoder call in setup")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Owlv2Agent(DetectorAgent):
    """Open-vocabulary detection of the tag vocabulary with OWLv2; OA = TF-IDF of the labels."""

    version = "1"
    Params = Owlv2Params

    params: Owlv2Params

    def __init__(self, params: Owlv2Params | None = None):
        super().__init__(params)
        if "{}" not in self.params.text_template:
            raise ValueError(f"text_template must contain '{{}}', got {self.params.text_template!r}")
        self._model: Any = None
        self._processor: Any = None
        self._tags: list[str] = []
        self._queries: Any = None  # [V, d] normalised text embeddings of the vocabulary
        self._device = "cpu"

    def resources(self) -> Resources:
        return device_resources(self.params.device, 4.0)

    def setup(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from transformers import AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection
        except ImportError as err:
            raise MissingDependency("transformers", "transformers", "the owlv2 agent") from err
        p = self.params
        model = Owlv2ForObjectDetection.from_pretrained(
            p.model_id, revision=p.revision, dtype=getattr(torch, p.dtype)
        )
        tokenizer = AutoTokenizer.from_pretrained(p.model_id, revision=p.revision)
        processor = AutoImageProcessor.from_pretrained(p.model_id, revision=p.revision)
        self._attach(model, tokenizer, processor)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, image_processor: Any, params: Owlv2Params | None = None
    ) -> Owlv2Agent:
        """An agent around an already built model, tokenizer and image processor (``setup`` is a no-op)."""
        agent = cls(params)
        agent._attach(model, tokenizer, image_processor)
        return agent

    def _attach(self, model: Any, tokenizer: Any, image_processor: Any) -> None:
        import torch

        self._device = resolve_device(self.params.device)
        self._model = model.to(self._device).eval()
        self._processor = image_processor
        self._tags = load_tags(self.params.tags)
        texts = [self.params.text_template.format(tag) for tag in self._tags]
        max_length = self._model.config.text_config.max_position_embeddings
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.params.text_batch_size):
                batch = tokenizer(
                    texts[start : start + self.params.text_batch_size],
                    padding="max_length",
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                features = self._model.owlv2.get_text_features(
                    input_ids=batch["input_ids"].to(self._device),
                    attention_mask=batch["attention_mask"].to(self._device),
                ).pooler_output
                chunks.append(features / features.norm(dim=-1, keepdim=True))
        self._queries = torch.cat(chunks)

    def teardown(self) -> None:
        self._model = None
        self._queries = None

    @property
    def tags(self) -> list[str]:
        return list(self._tags)

    def detect_image(self, image: Image.Image) -> list[Detection]:
        import torch

        image = self._input_image(image, "owlv2")
        p = self.params
        inputs = self._processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self._device, next(self._model.parameters()).dtype)
        with torch.inference_mode():
            feature_map, _ = self._model.image_embedder(pixel_values=pixel_values)
            batch, height, width, dim = feature_map.shape
            image_feats = feature_map.reshape(batch, height * width, dim)
            queries = self._queries.to(image_feats.dtype)[None]
            logits, _ = self._model.class_predictor(image_feats, queries)
            boxes = self._model.box_predictor(image_feats, feature_map)
        scores, best = logits[0].float().sigmoid().max(dim=-1)
        # Boxes are relative to the square the processor padded the image into (bottom/right).
        side = max(image.width, image.height)
        cx, cy, w, h = boxes[0].float().unbind(-1)
        sx, sy = side / image.width, side / image.height
        xyxy = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], -1)
        xyxy = xyxy.clamp(0.0, 1.0)
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        keep = ((scores > p.score_threshold) & (area < p.max_box_area)).nonzero().flatten().tolist()
        found = [
            Detection(self._tags[int(best[i])], float(scores[i]), tuple(float(v) for v in xyxy[i].tolist()))
            for i in keep
        ]
        return dedup_same_label(found, p.iou_threshold)

