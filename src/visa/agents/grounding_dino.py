"""Grounding DINO over a tag vocabulary: the reference OA (object alignment) agent.

Reference procedure (METHOD.md, "OA"): the image is brought to the reference pixel range; every tag
is rendered ``"tag. "``; the vocabulary is shuffled three times (different seeds) and packed into
prompts of at most 250 tokens (:mod:`visa.agents.vocabulary`); each prompt is run against the
image. Per prompt, a query box is kept when its highest token probability exceeds
``box_threshold`` (0.4) and its area is below ``max_box_area`` (0.95 of the image); a kept box
detects a tag when the mean probability over the tag's word tokens exceeds ``text_threshold``
(0.4). Duplicates are then removed per label (IoU > 0.9, highest score first).

Repeats and duplicates **[our choice]**: the reference meant to merge the three repeats' detections
of the same object but, through a bookkeeping slip, removes every same-label overlap above the IoU
threshold, whatever prompt or repeat it came from. We keep that effective behaviour on purpose:
two boxes of one label that overlap by more than 0.9 IoU are one object, whether they came from one
prompt or from two repeats. ``labels`` then holds one entry per distinct detected object, and the
OA score (TF-IDF over the pool, :mod:`visa.agents.tfidf`) counts them.

Speed. The reference runs the whole model once per prompt, re-encoding the same image 80-90 times.
Only the text-image encoder, the decoder and the heads depend on the prompt, so this agent computes
the Swin backbone, the input projections and the flattened multi-scale features once per image
(:func:`encode_image`), computes the text backbone once per prompt for the whole run
(:func:`encode_text`; prompts are the same for every image), and runs the rest per prompt
(:func:`detect`), optionally several prompts per forward (``prompt_batch_size``) against the one
cached image encoding. ``reuse_features: false`` runs the reference's full forward per prompt
instead (for fidelity checks and speed comparisons).

``mode: fast`` **[our choice]** first finds candidate tags with a cheap pass (the image at
``fast_image_size`` on its short side, only the first ``fast_repeats`` repeat(s) of the prompts,
lower thresholds), then runs the full procedure (all repeats, reference thresholds and image size)
over the candidates only. BENCHMARKS.md reports its speed and its agreement with ``mode: full``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, MissingDependency, PerImageAgent, Resources, Unit
from visa.agents.tfidf import finalize_tfidf
from visa.agents.vocabulary import Prompt, TagSpan, load_tags, pack_prompts

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------------
# Box geometry shared by the detection agents (plain torch: torchvision is not a dependency).
# --------------------------------------------------------------------------------------------------
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes ``a`` [N, 4] and ``b`` [M, 4] in (x0, y0, x1, y1); [N, M]."""
    import torch

    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds ``iou_threshold``.
    Ties in score keep the earlier box (stable order).
    """
    import torch

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order])
    n = len(order)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    overlaps = (iou > iou_threshold).cpu()
    suppressed = suppressed.cpu()
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each group (boxes of different groups never suppress each other)."""
    import torch

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Shift every group to its own region of the plane, as far apart as the boxes are large.
    offset = groups.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


@dataclass(frozen=True, slots=True)
class Detection:
    """One (box, tag) detection; ``box`` is (x0, y0, x1, y1) relative to the image (0..1)."""

    tag: str
    score: float
    box: tuple[float, float, float, float]


def dedup_same_label(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Remove same-label duplicates: per tag, greedy NMS at ``iou_threshold``, highest score first.

    The result is sorted by tag, then by descending score.
    """
    import torch

    by_tag: dict[str, list[Detection]] = {}
    for det in detections:
        by_tag.setdefault(det.tag, []).append(det)
    kept: list[Detection] = []
    for tag in sorted(by_tag):
        group = by_tag[tag]
        boxes = torch.tensor([d.box for d in group], dtype=torch.float64)
        scores = torch.tensor([d.score for d in group], dtype=torch.float64)
        kept.extend(group[i] for i in nms(boxes, scores, iou_threshold).tolist())
    return kept


def grounded_detections(
    probs: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    spans: Sequence[TagSpan],
    box_threshold: float,
    text_threshold: float,
    max_box_area: float,
) -> list[Detection]:
    """Detections of one prompt from its token probabilities.

    ``probs`` [Q, T]: sigmoid of the logits of Q query boxes against the prompt's T token positions
    (positions past the prompt must be 0); ``boxes_cxcywh`` [Q, 4]: relative (cx, cy, w, h).
    A query is kept when its highest token probability > ``box_threshold`` and w * h <
    ``max_box_area``; it detects every tag whose word tokens have a mean probability >
    ``text_threshold`` (score = that mean).
    """
    import torch

    probs = probs.float()
    boxes_cxcywh = boxes_cxcywh.float()
    area = boxes_cxcywh[:, 2] * boxes_cxcywh[:, 3]
    keep = (probs.max(dim=-1).values > box_threshold) & (area < max_box_area)
    if not bool(keep.any()) or not spans:
        return []
    kept_probs = probs[keep]
    cx, cy, w, h = boxes_cxcywh[keep].unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0.0, 1.0)
    tag_probs = torch.stack([kept_probs[:, s.start : s.end].mean(dim=-1) for s in spans], dim=-1)
    hits = (tag_probs > text_threshold).nonzero().tolist()
    return [
        Detection(spans[j].tag, float(tag_probs[i, j]), tuple(float(v) for v in xyxy[i].tolist()))
        for i, j in hits
    ]


# --------------------------------------------------------------------------------------------------
# The model, split at its image/prompt seam.
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageEncoding:
    """Everything Grounding DINO computes from the image alone (batch of one image)."""

    source_flatten: Any
    mask_flatten: Any
    lvl_pos_embed_flatten: Any
    spatial_shapes: Any
    spatial_shapes_list: list[tuple[int, int]]
    level_start_index: Any
    valid_ratios: Any


@dataclass
class TextEncoding:
    """Everything Grounding DINO computes from one prompt alone (batch of one prompt)."""

    features: Any  # [1, T, d_model]: projected text backbone output
    token_mask: Any  # [1, T] bool
    self_attention_masks: Any  # [1, T, T] bool: tokens see their own phrase only
    position_ids: Any  # [1, T]


def encode_image(model: Any, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> ImageEncoding:
    """Backbone, input projections and flattening of ``GroundingDinoModel.forward`` (one image)."""
    import torch
    from torch import nn

    inner = model.model
    vision_features, position_embeddings_list = inner.backbone(pixel_values, pixel_mask)
    feature_maps, masks = [], []
    for level, (source, mask) in enumerate(vision_features):
        feature_maps.append(inner.input_proj_vision[level](source))
        masks.append(mask)
    position_embeddings_list = list(position_embeddings_list)
    if inner.config.num_feature_levels > len(feature_maps):
        n_sources = len(feature_maps)
        for level in range(n_sources, inner.config.num_feature_levels):
            if level == n_sources:
                source = inner.input_proj_vision[level](vision_features[-1][0])
            else:
                source = inner.input_proj_vision[level](feature_maps[-1])
            mask = nn.functional.interpolate(pixel_mask[None].float(), size=source.shape[-2:]).to(torch.bool)[
                0
            ]
            feature_maps.append(source)
            masks.append(mask)
            position_embeddings_list.append(inner.backbone.position_embedding(source, mask).to(source.dtype))

    sources, flat_masks, pos_embeds, shapes = [], [], [], []
    for level, (source, mask, pos_embed) in enumerate(zip(feature_maps, masks, position_embeddings_list)):
        shapes.append((source.shape[2], source.shape[3]))
        sources.append(source.flatten(2).transpose(1, 2))
        flat_masks.append(mask.flatten(1))
        pos_embeds.append(pos_embed.flatten(2).transpose(1, 2) + inner.level_embed[level].view(1, 1, -1))
    source_flatten = torch.cat(sources, 1)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=source_flatten.device)
    return ImageEncoding(
        source_flatten=source_flatten,
        mask_flatten=torch.cat(flat_masks, 1),
        lvl_pos_embed_flatten=torch.cat(pos_embeds, 1),
        spatial_shapes=spatial_shapes,
        spatial_shapes_list=shapes,
        level_start_index=torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])),
        valid_ratios=torch.stack([inner.get_valid_ratio(m, dtype=source_flatten.dtype) for m in masks], 1),
    )


def encode_text(model: Any, input_ids: torch.Tensor) -> TextEncoding:
    """Text backbone and projection of ``GroundingDinoModel.forward`` for one prompt [1, T]."""
    import torch
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    inner = model.model
    if input_ids.shape[1] > inner.config.max_text_len:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens exceeds max_text_len={inner.config.max_text_len}"
        )
    self_masks, position_ids = generate_masks_with_special_tokens_and_transfer_map(
        input_ids, inner.special_tokens
    )
    token_type_ids = torch.zeros_like(input_ids)
    text_outputs = inner.text_backbone(
        input_ids, self_masks[:, None], token_type_ids, position_ids, return_dict=True
    )
    return TextEncoding(
        features=inner.text_projection(text_outputs.last_hidden_state),
        token_mask=torch.ones_like(input_ids, dtype=torch.bool),
        self_attention_masks=self_masks,
        position_ids=position_ids,
    )


def _stack_text(encodings: Sequence[TextEncoding]) -> TextEncoding:
    """Pad prompts of different lengths into one batch (padding is masked everywhere)."""
    import torch

    length = max(e.features.shape[1] for e in encodings)
    features, token_masks, self_masks, position_ids = [], [], [], []
    for e in encodings:
        pad = length - e.features.shape[1]
        features.append(torch.nn.functional.pad(e.features, (0, 0, 0, pad)))
        token_masks.append(torch.nn.functional.pad(e.token_mask, (0, pad), value=False))
        square = torch.eye(length, dtype=torch.bool, device=e.self_attention_masks.device)[None].clone()
        square[:, : length - pad, : length - pad] = e.self_attention_masks
        self_masks.append(square)
        position_ids.append(torch.nn.functional.pad(e.position_ids, (0, pad)))
    return TextEncoding(
        torch.cat(features), torch.cat(token_masks), torch.cat(self_masks), torch.cat(position_ids)
    )


def detect(
    model: Any, image: ImageEncoding, text: TextEncoding, num_queries: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt-dependent rest of ``GroundingDinoForObjectDetection.forward``.

    Runs the text-image encoder, the two-stage query selection, the decoder and the last-layer heads
    for a batch of B prompts (``text``) against one cached image. Returns logits [B, Q, max_text_len]
    and relative (cx, cy, w, h) boxes [B, Q, 4], as the full forward does. ``num_queries`` below the
    model's own number decodes only the best-ranked proposals (two-stage models; for cheap passes).
    """
    import torch

    inner = model.model
    config = inner.config
    batch = text.features.shape[0]

    def per_prompt(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:])

    source_flatten = per_prompt(image.source_flatten)
    mask_flatten = per_prompt(image.mask_flatten)
    valid_ratios = per_prompt(image.valid_ratios)
    encoder_outputs = inner.encoder(
        vision_features=source_flatten,
        vision_attention_mask=~mask_flatten,
        vision_position_embedding=per_prompt(image.lvl_pos_embed_flatten),
        spatial_shapes=image.spatial_shapes,
        spatial_shapes_list=image.spatial_shapes_list,
        level_start_index=image.level_start_index,
        valid_ratios=valid_ratios,
        text_features=text.features,
        text_attention_mask=~text.token_mask,
        text_position_embedding=None,
        text_self_attention_masks=~text.self_attention_masks,
        text_position_ids=text.position_ids,
        return_dict=True,
    )
    vision_memory, text_memory = encoder_outputs[0], encoder_outputs[1]
    n_queries = config.num_queries if num_queries is None else min(num_queries, config.num_queries)
    if not config.two_stage:
        n_queries = config.num_queries
    query_embeds = None
    if config.embedding_init_target or config.two_stage:
        query_embeds = inner.query_position_embeddings.weight[:n_queries]
    if config.two_stage:
        object_query_embedding, output_proposals = inner.generate_encoder_output_proposals(
            vision_memory, ~mask_flatten, image.spatial_shapes_list
        )
        enc_outputs_class = inner.encoder_output_class_embed(
            object_query_embedding, text_memory, text.token_mask
        )
        enc_outputs_coord_logits = inner.encoder_output_bbox_embed(object_query_embedding) + output_proposals
        topk_proposals = torch.topk(enc_outputs_class.max(-1)[0], n_queries, dim=1)[1]
        topk_coords_logits = torch.gather(
            enc_outputs_coord_logits, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
        )
        reference_points = topk_coords_logits.sigmoid()
        if query_embeds is not None:
            target = query_embeds.unsqueeze(0).repeat(batch, 1, 1)
        else:
            target = torch.gather(
                object_query_embedding, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, config.d_model)
            )
    else:
        target = query_embeds.unsqueeze(0).repeat(batch, 1, 1)
        reference_points = inner.reference_points.weight.unsqueeze(0).repeat(batch, 1, 1).sigmoid()
    # The decoder sizes its text mask by ``config.num_queries``; decoding fewer queries needs that
    # number for the duration of the call (restored afterwards, also on error).
    saved_num_queries = inner.decoder.config.num_queries
    inner.decoder.config.num_queries = n_queries
    try:
        decoder_outputs = _decode(
            inner,
            target,
            vision_memory,
            mask_flatten,
            text_memory,
            text,
            reference_points,
            image,
            valid_ratios,
        )
    finally:
        inner.decoder.config.num_queries = saved_num_queries
    hidden_states = decoder_outputs.intermediate_hidden_states
    last = hidden_states.shape[1] - 1
    reference = reference_points if last == 0 else decoder_outputs.intermediate_reference_points[:, last - 1]
    reference = torch.special.logit(reference, eps=1e-5)
    logits = model.class_embed[last](
        vision_hidden_state=hidden_states[:, last],
        text_hidden_state=text_memory,
        text_token_mask=text.token_mask,
    )
    delta = model.bbox_embed[last](hidden_states[:, last])
    if reference.shape[-1] == 4:
        coord_logits = delta + reference
    else:
        coord_logits = delta.clone()
        coord_logits[..., :2] += reference
    return logits, coord_logits.sigmoid()


def _decode(
    inner, target, vision_memory, mask_flatten, text_memory, text, reference_points, image, valid_ratios
):
    return inner.decoder(
        inputs_embeds=target,
        vision_encoder_hidden_states=vision_memory,
        vision_encoder_attention_mask=mask_flatten,
        text_encoder_hidden_states=text_memory,
        text_encoder_attention_mask=~text.token_mask,
        reference_points=reference_points,
        spatial_shapes=image.spatial_shapes,
        spatial_shapes_list=image.spatial_shapes_list,
        level_start_index=image.level_start_index,
        valid_ratios=valid_ratios,
        self_attn_mask=None,
        return_dict=True,
    )


# --------------------------------------------------------------------------------------------------
# The agent.
# --------------------------------------------------------------------------------------------------
class GroundingDinoParams(AgentParams):
    batch_size: int = 1
    model_id: str = "IDEA-Research/grounding-dino-base"
    revision: str = "main"
    tags: str = Field("bundled", description="tag file, or 'bundled' for the packaged 1,886-tag vocabulary")
    repeats: int = Field(3, ge=1, description="shuffled copies of the vocabulary (seeds seed, seed+1, ...)")
    seed: int = 0
    max_prompt_tokens: int = Field(250, ge=2, le=254)
    box_threshold: float = Field(0.4, ge=0.0, le=1.0)
    text_threshold: float = Field(0.4, ge=0.0, le=1.0)
    max_box_area: float = Field(
        0.95, gt=0.0, le=1.0, description="boxes covering this share or more are ignored"
    )
    iou_threshold: float = Field(
        0.9, ge=0.0, le=1.0, description="same-label duplicates above this IoU are merged"
    )
    mode: Literal["full", "fast"] = "full"
    reuse_features: bool = Field(
        True, description="false: full model forward per prompt (the reference's way)"
    )
    prompt_batch_size: int = Field(1, ge=1, description="prompts per forward against one cached image")
    reference_resize: bool = Field(True, description="first bring the image to the reference pixel range")
    image_size: int = Field(800, ge=32, description="short side fed to the model")
    max_image_size: int = Field(1333, ge=32, description="long side cap fed to the model")
    fast_image_size: int = Field(400, ge=32, description="short side of the candidate pass (mode fast)")
    fast_repeats: int = Field(1, ge=1, description="repeats of the candidate pass (mode fast)")
    fast_box_threshold: float = Field(0.3, ge=0.0, le=1.0)
    fast_text_threshold: float = Field(0.3, ge=0.0, le=1.0)
    fast_num_queries: int = Field(300, ge=1, description="decoded queries in the candidate pass (mode fast)")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is returned as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available")
    return device


def device_resources(device: str, gpu_memory_gb: float) -> Resources:
    """What an agent on ``device`` needs: one GPU for cuda (and for auto when CUDA is present)."""
    if device == "cpu":
        return Resources(cpus=1.0)
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            return Resources(cpus=1.0)
    return Resources(cpus=1.0, gpus=1.0, gpu_memory_gb=gpu_memory_gb)


class DetectorAgent(PerImageAgent):
    """Base of the open-vocabulary detectors (Grounding DINO, OWLv2) over the tag vocabulary.

    Subclasses implement ``detect_image``. Outputs per image: ``labels`` (one tag per detected
    object), ``boxes`` (relative x0, y0, x1, y1, aligned with ``labels``), ``confidences``;
    ``finalize`` adds ``score``, the TF-IDF of the labels over the pool (OA).
    """

    unit = Unit.IMAGE
    outputs: ClassVar[dict[str, pa.DataType]] = {
        "labels": pa.list_(pa.string()),
        "boxes": pa.list_(pa.list_(pa.float32(), 4)),
        "confidences": pa.list_(pa.float32()),
    }
    finalized_outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64()}
    requires: ClassVar[dict[str, str]] = {"transformers": "transformers"}
    _model: Any = None

    def models(self) -> dict[str, str]:
        return {self.params.model_id: self.params.revision}  # type: ignore[attr-defined]

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        """Detections of one RGB image (before the pool-level TF-IDF)."""
        detections = self.detect_image(image)
        return {
            "labels": [d.tag for d in detections],
            "boxes": [list(d.box) for d in detections],
            "confidences": [d.score for d in detections],
        }

    @abstractmethod
    def detect_image(self, image: Image.Image) -> list[Detection]:
        """Detections of the tag vocabulary in one image."""

    def _input_image(self, image: Image.Image, name: str) -> Image.Image:
        """The RGB image the detector sees (after the reference resize when enabled)."""
        if self._model is None:
            raise RuntimeError(f"{name} agent used before setup()")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image ({image.width}x{image.height})")
        image = image.convert("RGB")
        if self.params.reference_resize:  # type: ignore[attr-defined]
            from visa.agents.resize import reference_resize

            image = reference_resize(image)
        return image

    def finalize(self, table: pa.Table) -> pa.Table:
        return finalize_tfidf(table)


class GroundingDinoAgent(DetectorAgent):
    """Open-vocabulary detection of the tag vocabulary with Grounding DINO; OA = TF-IDF of the labels.

    Outputs per image: ``labels`` (one tag per detected object), ``boxes`` (relative x0, y0, x1, y1,
    aligned with ``labels``), ``confidences``; ``finalize`` adds ``score`` (TF-IDF over the pool).
    """

    version = "1"
    Params = GroundingDinoParams

    params: GroundingDinoParams

    def __init__(self, params: GroundingDinoParams | None = None):
        super().__init__(params)
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None
        self._device = "cpu"
        self._prompts: list[Prompt] = []
        self._text_cache: dict[tuple[int, ...], TextEncoding] = {}
        self._vocabulary_ids: set[tuple[int, ...]] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def resources(self) -> Resources:
        return device_resources(self.params.device, 6.0)

    def setup(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from transformers import AutoImageProcessor, AutoTokenizer, GroundingDinoForObjectDetection
        except ImportError as err:
            raise MissingDependency("transformers", "transformers", "the grounding_dino agent") from err
        p = self.params
        dtype = getattr(torch, p.dtype)
        model = GroundingDinoForObjectDetection.from_pretrained(p.model_id, revision=p.revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(p.model_id, revision=p.revision)
        image_processor = AutoImageProcessor.from_pretrained(p.model_id, revision=p.revision)
        self._attach(model, tokenizer, image_processor)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, image_processor: Any, params: GroundingDinoParams | None = None
    ) -> GroundingDinoAgent:
        """An agent around an already built model, tokenizer and image processor (``setup`` is a no-op).

        For tests and for callers that share one loaded model between agents.
        """
        agent = cls(params)
        agent._attach(model, tokenizer, image_processor)
        return agent

    def _attach(self, model: Any, tokenizer: Any, image_processor: Any) -> None:
        self._device = resolve_device(self.params.device)
        self._model = model.to(self._device).eval()
        self._tokenizer = tokenizer
        self._image_processor = image_processor
        self._text_cache = {}
        self._prompts = self.pack(load_tags(self.params.tags), self.params.repeats)
        self._vocabulary_ids = {prompt.input_ids for prompt in self._prompts}

    def teardown(self) -> None:
        self._model = None
        self._text_cache = {}

    # -- prompts --------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[Prompt]:
        """The packed prompts of the whole vocabulary (all repeats)."""
        return list(self._prompts)

    def pack(self, tags: Sequence[str], repeats: int) -> list[Prompt]:
        """Pack ``tags`` with this agent's tokenizer, token budget and seed."""
        tok = self._tokenizer
        return pack_prompts(
            tags,
            encode=lambda text: tok(text, add_special_tokens=False)["input_ids"],
            cls_id=tok.cls_token_id,
            sep_id=tok.sep_token_id,
            max_tokens=self.params.max_prompt_tokens,
            repeats=repeats,
            seed=self.params.seed,
        )

    # -- scoring --------------------------------------------------------------------------------
    def detect_image(self, image: Image.Image) -> list[Detection]:
        import torch

        image = self._input_image(image, "grounding_dino")
        p = self.params
        with torch.inference_mode():
            if p.mode == "full":
                found = self._run(image, p.image_size, self._prompts, p.box_threshold, p.text_threshold)
            else:
                first = [q for q in self._prompts if q.repeat < p.fast_repeats]
                cheap = self._run(
                    image,
                    p.fast_image_size,
                    first,
                    p.fast_box_threshold,
                    p.fast_text_threshold,
                    p.fast_num_queries,
                )
                candidates = sorted({d.tag for d in cheap})
                found = []
                if candidates:
                    prompts = self.pack(candidates, p.repeats)
                    found = self._run(image, p.image_size, prompts, p.box_threshold, p.text_threshold)
        return dedup_same_label(found, p.iou_threshold)

    def _pixels(self, image: Image.Image, short_side: int) -> tuple[torch.Tensor, torch.Tensor]:
        long_side = max(self.params.max_image_size, short_side)
        inputs = self._image_processor(
            images=image, size={"shortest_edge": short_side, "longest_edge": long_side}, return_tensors="pt"
        )
        dtype = next(self._model.parameters()).dtype
        pixel_values = inputs["pixel_values"].to(self._device, dtype)
        pixel_mask = inputs["pixel_mask"].to(self._device) if "pixel_mask" in inputs else None
        if pixel_mask is None:
            import torch

            pixel_mask = torch.ones(
                pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.long, device=self._device
            )
        return pixel_values, pixel_mask

    def _text(self, prompt: Prompt) -> TextEncoding:
        import torch

        cached = self._text_cache.get(prompt.input_ids)
        if cached is not None:
            return cached
        ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=self._device)
        encoding = encode_text(self._model, ids)
        if prompt.input_ids in self._vocabulary_ids:  # per-image prompts (fast mode) are not kept
            self._text_cache[prompt.input_ids] = encoding
        return encoding

    def _run(
        self,
        image: Image.Image,
        short_side: int,
        prompts: Sequence[Prompt],
        box_threshold: float,
        text_threshold: float,
        num_queries: int | None = None,
    ) -> list[Detection]:
        """All (box, tag) detections of ``prompts`` against ``image`` (before de-duplication)."""
        import torch

        p = self.params
        pixel_values, pixel_mask = self._pixels(image, short_side)
        detections: list[Detection] = []

        def collect(prompt: Prompt, logits: torch.Tensor, boxes: torch.Tensor) -> None:
            detections.extend(
                grounded_detections(
                    logits.float().sigmoid(),
                    boxes,
                    prompt.spans,
                    box_threshold,
                    text_threshold,
                    p.max_box_area,
                )
            )

        if not p.reuse_features:
            for prompt in prompts:
                ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=self._device)
                out = self._model(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=ids)
                collect(prompt, out.logits[0], out.pred_boxes[0])
            return detections

        encoding = encode_image(self._model, pixel_values, pixel_mask)
        for start in range(0, len(prompts), p.prompt_batch_size):
            chunk = prompts[start : start + p.prompt_batch_size]
            texts = [self._text(q) for q in chunk]
            text = texts[0] if len(texts) == 1 else _stack_text(texts)
            logits, boxes = detect(self._model, encoding, text, num_queries)
            for i, prompt in enumerate(chunk):
                collect(prompt, logits[i], boxes[i])
        return detections

    # -- pool -----------------------------------------------------------------------------------
