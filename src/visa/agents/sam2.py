"""SAM 2.1 automatic mask generation: the reference SC (segmentation complexity) agent.

SC(image) = the number of masks, found by SAM 2.1's automatic mask generator with the reference
settings (METHOD.md, "SC"), that cover at least 0.5% of the image.

The generator follows SAM 2's ``SAM2AutomaticMaskGenerator.generate()`` step by step, on top of
transformers' ``Sam2Model`` (which runs without torchvision); ``benchmarks/sam2_fidelity.py`` compares
the two on identical random weights:

1. crops: the whole image, then ``crop_n_layers`` layers of 2^i x 2^i overlapping crops, in the
   reference's order (column by column);
2. per crop: the crop resized to the model's square input (bilinear, antialiased, on the [0, 1]
   tensor; ImageNet normalisation) and embedded once; a regular grid of point prompts
   (``points_per_side``, divided by ``crop_n_points_downscale_factor`` per layer) decoded in batches
   into three masks per point. The low-resolution logits first get SAM 2's hole and sprinkle filling
   (background / foreground components of the decoder's logits of at most ``min_mask_region_area``
   low-resolution pixels, 8-connectivity, at logit threshold 0, set to +10 / -10), then are upsampled to the crop size.
   With ``use_m2m`` every mask is decoded once more with its raw low-resolution logits, clamped to
   +-32, as mask prompt, and the refined masks replace the first ones. Masks are kept when the
   predicted IoU > ``pred_iou_thresh`` and the stability score (float32 IoU of the mask thresholded at
   ``mask_threshold`` +/- ``stability_score_offset``) >= ``stability_score_thresh`` (each test only
   when its threshold is > 0, as in the reference); masks whose box touches a crop edge that is not
   an image edge are dropped; box NMS (``box_nms_thresh``, by predicted IoU) within the crop;
3. across crops: box NMS (``crop_nms_thresh``) preferring masks from smaller crops (ties: crop
   order, then score order within the crop).

Nothing else by default: SAM-v1-style full-resolution removal of small regions followed by another
NMS is :attr:`Sam2Params.postprocess_small_regions` (off; ``paper`` leaves it off).
Points per batch shrink with the image size so that the upsampled mask logits and the decoder's
per-point copies of the image features stay within ``memory_budget_mb`` (default: 2 GiB on CPU, a
quarter of the GPU's memory up to 16 GiB on CUDA). On CUDA the model runs under bf16 autocast (the
reference does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, MissingDependency, PerImageAgent, Resources, Unit
from visa.agents.grounding_dino import batched_nms, device_resources, nms, resolve_device

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Geometry and mask post-processing (pure functions; tested on hand-built data).
# --------------------------------------------------------------------------------------------------
def crop_boxes(
    width: int, height: int, n_layers: int, overlap_ratio: float
) -> list[tuple[tuple[int, int, int, int], int]]:
    """Crop boxes (x0, y0, x1, y1; exclusive ends) with their layer: the image, then n x n grids.

    Layer i has 2^i crops per side that overlap by ``overlap_ratio`` of the short side, scaled by
    2 / 2^i.
    """
    boxes: list[tuple[tuple[int, int, int, int], int]] = [((0, 0, width, height), 0)]
    short_side = min(width, height)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        for i in range(per_side):  # column by column, as the reference (itertools.product(x0s, y0s))
            for j in range(per_side):
                x0, y0 = (crop_w - overlap) * i, (crop_h - overlap) * j
                boxes.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return boxes


def point_grid(per_side: int) -> np.ndarray:
    """``per_side``^2 points (x, y) in [0, 1], cell centres of a regular grid."""
    if per_side < 1:
        raise ValueError(f"points per side must be positive, got {per_side}")
    offset = 1 / (2 * per_side)
    axis = np.linspace(offset, 1 - offset, per_side)
    xs, ys = np.meshgrid(axis, axis)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks ``logits > threshold + offset`` and ``logits > threshold - offset``.

    ``logits`` [N, H, W]; float32 like the reference, so that comparisons at the threshold agree. An
    empty lower mask gives NaN (0 / 0), which no threshold test passes.
    """
    import torch

    inner = (logits > threshold + offset).flatten(1).sum(-1, dtype=torch.int32)
    outer = (logits > threshold - offset).flatten(1).sum(-1, dtype=torch.int32)
    return inner.float() / outer.float()


def component_areas(binary: torch.Tensor) -> torch.Tensor:
    """For every True pixel of ``binary`` [N, H, W], the area of its 8-connected component (0 elsewhere).

    What SAM 2's compiled ``get_connected_components`` returns as counts; here with scipy when it is
    installed, else by label propagation in torch (no compiled extension needed either way).
    """
    import torch

    try:
        from scipy import ndimage
    except ImportError:
        return _component_areas_torch(binary)
    array = binary.detach().cpu().numpy()
    areas = np.zeros(array.shape, dtype=np.int64)
    structure = np.ones((3, 3), dtype=bool)
    for k in range(array.shape[0]):
        labels, count = ndimage.label(array[k], structure=structure)
        if count:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            areas[k] = sizes[labels]
    return torch.from_numpy(areas).to(binary.device)


def _component_areas_torch(binary: torch.Tensor) -> torch.Tensor:
    """:func:`component_areas` by max-label propagation over 3x3 neighbourhoods until nothing changes."""
    import torch

    n, h, w = binary.shape
    mask = binary.bool()
    index = torch.arange(1, h * w + 1, device=binary.device, dtype=torch.float32).view(1, h, w).expand(n, h, w)
    labels = torch.where(mask, index, torch.zeros_like(index))
    while True:
        spread = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0]
        spread = torch.where(mask, spread, torch.zeros_like(spread))
        if torch.equal(spread, labels):
            break
        labels = spread
    flat = labels.long().view(n, -1)
    counts = torch.zeros(n, h * w + 1, dtype=torch.long, device=binary.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    return torch.gather(counts, 1, flat).view(n, h, w)


def fill_holes_and_sprinkles(logits: torch.Tensor, max_area: int, threshold: float = 0.0) -> torch.Tensor:
    """SAM 2's low-resolution mask post-processing (``SAM2Transforms.postprocess_masks``).

    On ``logits`` [N, H, W]: background components (``<= threshold``) of at most ``max_area`` pixels
    become ``threshold + 10``, then foreground components (``> threshold``) of at most ``max_area``
    pixels become ``threshold - 10``. Both sets of components are those of the input logits (the
    reference labels the sprinkles on the logits as they were before the holes were filled).
    ``max_area`` <= 0 leaves the logits unchanged.
    """
    import torch

    if max_area <= 0 or logits.numel() == 0:
        return logits
    background = logits <= threshold
    holes = background & (component_areas(background) <= max_area)
    foreground = ~background
    sprinkles = foreground & (component_areas(foreground) <= max_area)
    logits = torch.where(holes, torch.full_like(logits, threshold + 10.0), logits)
    return torch.where(sprinkles, torch.full_like(logits, threshold - 10.0), logits)


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (x0, y0, x1, y1; inclusive pixel indices) of masks [N, H, W]; empty -> zeros."""
    import torch

    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    cols = masks.any(dim=1)  # [N, W]
    rows = masks.any(dim=2)  # [N, H]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, -1).max(-1).values
    x0 = torch.where(cols, xs, w).min(-1).values
    y1 = torch.where(rows, ys, -1).max(-1).values
    y0 = torch.where(rows, ys, h).min(-1).values
    boxes = torch.stack([x0, y0, x1, y1], -1).float()
    empty = ~cols.any(-1)
    boxes[empty] = 0
    return boxes


def near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Boxes (image coordinates) within ``atol`` px of a crop edge that is not also an image edge."""
    import torch

    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    close_to_crop = torch.isclose(boxes.float(), crop[None], atol=atol, rtol=0)
    close_to_image = torch.isclose(boxes.float(), image[None], atol=atol, rtol=0)
    return (close_to_crop & ~close_to_image).any(dim=1)


def remove_small_regions(
    mask: np.ndarray,
    min_area: int,
    mode: Literal["holes", "islands"],
    outside_touching: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """Fill holes or remove islands smaller than ``min_area`` pixels (8-connectivity).

    ``holes``: background components smaller than ``min_area`` become mask. ``islands``: mask
    components smaller than ``min_area`` are dropped, but when every component is small the largest
    stays. ``outside_touching`` (bool, same shape) marks pixels that connect to area outside the array:
    a background component containing one of them is never a hole. Returns (mask, changed).
    """
    from scipy import ndimage

    working = ~mask if mode == "holes" else mask
    labels, count = ndimage.label(working, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    small = sizes < min_area
    if mode == "holes" and outside_touching is not None:
        open_labels = np.unique(labels[outside_touching & working])
        small[open_labels[open_labels > 0] - 1] = False
    if not small.any():
        return mask, False
    if mode == "holes":
        return mask | np.isin(labels, np.flatnonzero(small) + 1), True
    keep = np.flatnonzero(~small) + 1
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True


@dataclass
class MaskRecord:
    """One mask, stored as its tight bounding box (image coordinates, inclusive) and the pixels inside."""

    box: tuple[int, int, int, int]
    pixels: np.ndarray  # bool [y1 - y0 + 1, x1 - x0 + 1]
    iou: float
    stability: float
    crop: int

    @property
    def area(self) -> int:
        return int(self.pixels.sum())


def clean_small_regions(
    record: MaskRecord, width: int, height: int, min_area: int
) -> tuple[MaskRecord, bool]:
    """:func:`remove_small_regions` (holes, then islands) on one mask; returns (record, unchanged).

    Works on the mask's box plus a one-pixel ring (clipped to the image); ring pixels stand for the
    background outside the box, so holes open to the outside are never filled.
    """
    x0, y0, x1, y1 = record.box
    wx0, wy0, wx1, wy1 = max(0, x0 - 1), max(0, y0 - 1), min(width - 1, x1 + 1), min(height - 1, y1 + 1)
    window = np.zeros((wy1 - wy0 + 1, wx1 - wx0 + 1), dtype=bool)
    window[y0 - wy0 : y1 - wy0 + 1, x0 - wx0 : x1 - wx0 + 1] = record.pixels
    ring = np.ones_like(window)
    ring[y0 - wy0 : y1 - wy0 + 1, x0 - wx0 : x1 - wx0 + 1] = False
    window, holes = remove_small_regions(window, min_area, "holes", outside_touching=ring)
    window, islands = remove_small_regions(window, min_area, "islands")
    if not (holes or islands):
        return record, True
    ys, xs = np.nonzero(window)
    if ys.size == 0:
        return MaskRecord(
            (0, 0, 0, 0), np.zeros((1, 1), dtype=bool), record.iou, record.stability, record.crop
        ), False
    box = (int(xs.min()) + wx0, int(ys.min()) + wy0, int(xs.max()) + wx0, int(ys.max()) + wy0)
    pixels = window[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return MaskRecord(box, pixels, record.iou, record.stability, record.crop), False


# --------------------------------------------------------------------------------------------------
# The agent.
# --------------------------------------------------------------------------------------------------
class Sam2Params(AgentParams):
    batch_size: int = 1
    model_id: str = "facebook/sam2.1-hiera-large"
    revision: str = "main"
    points_per_side: int = Field(16, ge=1)
    points_per_batch: int | None = Field(
        None, ge=1, description="None: from the image size and memory_budget_mb"
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=64,
        description="working memory of one point batch; None: 2 GiB on CPU, 1/4 of the GPU (<= 16 GiB)",
    )
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 0.7
    mask_threshold: float = 0.5
    box_nms_thresh: float = 0.7
    crop_n_layers: int = Field(1, ge=0, le=4)
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = Field(512 / 1500, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int = Field(2, ge=1)
    min_mask_region_area: int = Field(
        25, ge=0, description="largest hole / sprinkle (low-resolution pixels) filled before the stability score"
    )
    postprocess_small_regions: bool = Field(
        False,
        description="also remove full-resolution holes/islands below min_mask_region_area, then NMS (SAM v1; "
        "not part of SAM 2's generator)",
    )
    use_m2m: bool = True
    multimask_output: bool = True
    min_area_fraction: float = Field(0.005, ge=0.0, le=1.0, description="SC counts masks covering this share")
    reference_resize: bool = True
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    autocast_bf16: bool = Field(True, description="bf16 autocast on CUDA, as the reference")


class Sam2Agent(PerImageAgent):
    """Segmentation complexity: SAM 2.1 automatic masks covering >= 0.5% of the image.

    Outputs: ``score`` (that count), ``n_masks`` (all masks after post-processing), ``mask_areas``
    (relative area of every mask, largest first).
    """

    unit = Unit.IMAGE
    version = "2"
    Params = Sam2Params
    outputs: ClassVar[dict[str, pa.DataType]] = {
        "score": pa.float64(),
        "n_masks": pa.int32(),
        "mask_areas": pa.list_(pa.float32()),
    }
    requires: ClassVar[dict[str, str]] = {"transformers": "sam2"}

    params: Sam2Params

    def __init__(self, params: Sam2Params | None = None):
        super().__init__(params)
        self._model: Any = None
        self._device = "cpu"

    def models(self) -> dict[str, str]:
        return {self.params.model_id: self.params.revision}

    def resources(self) -> Resources:
        return device_resources(self.params.device, 8.0)

    def setup(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from transformers import Sam2Model
        except ImportError as err:
            raise MissingDependency("transformers", "sam2", "the sam2 agent") from err
        model = Sam2Model.from_pretrained(
            self.params.model_id, revision=self.params.revision, dtype=getattr(torch, self.params.dtype)
        )
        self._attach(model)

    @classmethod
    def from_model(cls, model: Any, params: Sam2Params | None = None) -> Sam2Agent:
        """An agent around an already built ``Sam2Model`` (``setup`` is then a no-op)."""
        agent = cls(params)
        agent._attach(model)
        return agent

    def _attach(self, model: Any) -> None:
        self._device = resolve_device(self.params.device)
        self._model = model.to(self._device).eval()

    def teardown(self) -> None:
        self._model = None

    # -- scoring --------------------------------------------------------------------------------
    def score_image(self, image: Image.Image) -> dict[str, Any]:
        masks, (width, height) = self.generate(image)
        total = float(width * height)
        areas = sorted((m.area / total for m in masks), reverse=True)
        threshold = self.params.min_area_fraction
        return {
            "score": float(sum(a >= threshold for a in areas)),
            "n_masks": len(masks),
            "mask_areas": areas,
        }

    def _autocast(self):
        import contextlib

        import torch

        if self._device.startswith("cuda") and self.params.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generate(self, image: Image.Image) -> tuple[list[MaskRecord], tuple[int, int]]:
        """All masks of ``image`` (after the reference resize) and the size they refer to."""
        import torch

        if self._model is None:
            raise RuntimeError("sam2 agent used before setup()")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image ({image.width}x{image.height})")
        p = self.params
        image = image.convert("RGB")
        if p.reference_resize:
            from visa.agents.resize import reference_resize

            image = reference_resize(image)
        width, height = image.size
        records: list[MaskRecord] = []
        crops = crop_boxes(width, height, p.crop_n_layers, p.crop_overlap_ratio)
        with torch.inference_mode(), self._autocast():
            for index, (box, layer) in enumerate(crops):
                per_side = max(1, p.points_per_side // (p.crop_n_points_downscale_factor**layer))
                records.extend(self._crop_masks(image, box, index, per_side, (0, 0, width, height)))
        if len(crops) > 1 and records:
            crop_area = [float((b[2] - b[0]) * (b[3] - b[1])) for b, _ in crops]
            boxes = torch.tensor([r.box for r in records], dtype=torch.float32)
            scores = torch.tensor([1.0 / crop_area[r.crop] for r in records], dtype=torch.float64)
            records = [records[i] for i in nms(boxes, scores, p.crop_nms_thresh).tolist()]
        if p.postprocess_small_regions and p.min_mask_region_area > 0 and records:
            cleaned = [clean_small_regions(r, width, height, p.min_mask_region_area) for r in records]
            boxes = torch.tensor([r.box for r, _ in cleaned], dtype=torch.float32)
            scores = torch.tensor([float(unchanged) for _, unchanged in cleaned], dtype=torch.float64)
            groups = torch.zeros(len(cleaned), dtype=torch.long)
            records = [cleaned[i][0] for i in batched_nms(boxes, scores, groups, p.box_nms_thresh).tolist()]
            records = [r for r in records if r.area > 0]
        return records, (width, height)

    def points_per_batch(self, crop_width: int, crop_height: int) -> int:
        """Point prompts per decoder call: the configured number, else sized from the crop and memory."""
        if self.params.points_per_batch is not None:
            return self.params.points_per_batch
        size = self._model.config.prompt_encoder_config.image_size
        hidden = self._model.config.mask_decoder_config.hidden_size
        # Per point: 3 (x2 with m2m) upsampled float32 mask logits at crop size, and the decoder's
        # per-point copies of the image features (about 8 maps of hidden x (size/16)^2 floats).
        per_mask_logits = 4 * crop_width * crop_height * (3 if self.params.multimask_output else 1)
        per_point_features = 4 * hidden * (size // 16) ** 2 * 8
        per_point = per_mask_logits + per_point_features
        fit = max(1, self._memory_budget_mb() * 2**20 // per_point)
        return int(min(256, max(4, 2 ** int(math.log2(fit)))))

    def _memory_budget_mb(self) -> int:
        if self.params.memory_budget_mb is not None:
            return self.params.memory_budget_mb
        if self._device.startswith("cuda"):
            import torch

            total = torch.cuda.get_device_properties(torch.device(self._device)).total_memory
            return int(min(16384, total / 4 / 2**20))
        return 2048

    def _embed(self, crop: Image.Image) -> list[torch.Tensor]:
        """The crop as the reference feeds it: [0, 1] tensor, antialiased bilinear resize, normalised."""
        import torch

        size = self._model.config.prompt_encoder_config.image_size
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255.0
        pixels = torch.nn.functional.interpolate(
            pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        dtype = next(self._model.parameters()).dtype
        return self._model.get_image_embeddings(((pixels - mean) / std).to(self._device, dtype))

    def _crop_masks(
        self,
        image: Image.Image,
        crop_box: tuple[int, int, int, int],
        crop_index: int,
        per_side: int,
        image_box: tuple[int, int, int, int],
    ) -> list[MaskRecord]:
        import torch

        p = self.params
        x0, y0, x1, y1 = crop_box
        crop_w, crop_h = x1 - x0, y1 - y0
        if crop_w < 1 or crop_h < 1:
            return []
        embeddings = self._embed(image.crop(crop_box))
        points = point_grid(per_side) * np.array([crop_w, crop_h])  # crop pixels, as the reference
        batch = self.points_per_batch(crop_w, crop_h)
        kept: list[MaskRecord] = []
        kept_boxes: list[torch.Tensor] = []
        kept_scores: list[torch.Tensor] = []
        for start in range(0, len(points), batch):
            records, boxes, scores = self._point_batch(
                embeddings, points[start : start + batch], crop_box, crop_index, image_box
            )
            kept.extend(records)
            kept_boxes.append(boxes)
            kept_scores.append(scores)
        if not kept:
            return []
        keep = nms(torch.cat(kept_boxes), torch.cat(kept_scores), p.box_nms_thresh)
        return [kept[i] for i in keep.tolist()]

    def _decode(self, embeddings, points: torch.Tensor, masks: torch.Tensor | None = None):
        """Masks for point prompts: [N, K, h, w] low-res logits and [N, K] predicted IoU."""
        import torch

        n = points.shape[0]
        labels = torch.ones(n, dtype=torch.long, device=points.device)
        if masks is None:  # one image, N point prompts, K = 3 (or 1) masks each
            out = self._model(
                image_embeddings=embeddings,
                input_points=points[None, :, None, :],
                input_labels=labels[None, :, None],
                multimask_output=self.params.multimask_output,
            )
            return out.pred_masks[0].float(), out.iou_scores[0].float()
        # Refinement: every prompt has its own mask input, so each is its own "image" of the batch.
        out = self._model(
            image_embeddings=[e.expand(n, *e.shape[1:]) for e in embeddings],
            input_points=points[:, None, None, :],
            input_labels=labels[:, None, None],
            input_masks=masks[:, None].to(embeddings[0].dtype),
            multimask_output=False,
        )
        return out.pred_masks[:, 0].float(), out.iou_scores[:, 0].float()

    def _point_batch(self, embeddings, points_xy: np.ndarray, crop_box, crop_index: int, image_box):
        """One batch of point prompts of a crop: decode, (refine), filter, binarise, boxes (reference order)."""
        import torch

        x0, y0, x1, y1 = crop_box
        crop_w, crop_h = x1 - x0, y1 - y0
        size = self._model.config.prompt_encoder_config.image_size
        points = torch.as_tensor(points_xy, dtype=torch.float32, device=self._device)
        points = points / torch.tensor([crop_w, crop_h], dtype=torch.float32, device=self._device) * size
        low_res, iou = self._decode(embeddings, points)  # [N, K, h, w], [N, K]
        k = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten()
        if self.params.use_m2m:
            low_res, iou = self._refine(embeddings, points.repeat_interleave(k, dim=0), low_res, crop_w, crop_h)
        logits, iou, stability = self._keep_quality(low_res, iou, crop_w, crop_h)
        empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.float64))
        if len(iou) == 0:
            return [], *empty
        masks = logits > self.params.mask_threshold
        del logits
        boxes = mask_to_box(masks)
        image_boxes = boxes + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype, device=boxes.device)
        keep = ~near_crop_edge(image_boxes, crop_box, image_box)
        masks, iou, stability, image_boxes, boxes = masks[keep], iou[keep], stability[keep], image_boxes[keep], boxes[keep]
        records = []
        for m, b, ib, q, s in zip(
            masks, boxes.long().tolist(), image_boxes.long().tolist(), iou.tolist(), stability.tolist(), strict=True
        ):
            pixels = m[b[1] : b[3] + 1, b[0] : b[2] + 1].cpu().numpy()
            records.append(MaskRecord(tuple(ib), pixels, q, s, crop_index))
        return records, image_boxes.float().cpu(), iou.double().cpu()

    def _refine(self, embeddings, points: torch.Tensor, low_res: torch.Tensor, crop_w: int, crop_h: int):
        """m2m: every mask decoded again with its own low-resolution logits (clamped to +-32) as prompt."""
        import torch

        low_res = low_res.clamp(-32.0, 32.0)
        refined, refined_iou = [], []
        step = max(1, self.points_per_batch(crop_w, crop_h))
        for s in range(0, len(points), step):
            masks, scores = self._decode(embeddings, points[s : s + step], low_res[s : s + step])
            refined.append(masks[:, 0])
            refined_iou.append(scores[:, 0])
        return torch.cat(refined), torch.cat(refined_iou)

    def _keep_quality(self, low_res: torch.Tensor, iou: torch.Tensor, crop_w: int, crop_h: int):
        """Hole/sprinkle filling, upsampling to the crop, then the predicted-IoU and stability tests."""
        import torch

        p = self.params
        if p.pred_iou_thresh > 0.0:
            keep = iou > p.pred_iou_thresh
            low_res, iou = low_res[keep], iou[keep]
        logits = fill_holes_and_sprinkles(low_res.float(), p.min_mask_region_area)
        logits = torch.nn.functional.interpolate(
            logits[:, None], size=(crop_h, crop_w), mode="bilinear", align_corners=False
        )[:, 0]
        stability = stability_score(logits, p.mask_threshold, p.stability_score_offset)
        if p.stability_score_thresh > 0.0:
            keep = stability >= p.stability_score_thresh
            logits, iou, stability = logits[keep], iou[keep], stability[keep]
        return logits, iou, stability


def sam2_config(*, tiny: bool) -> Any:
    """A ``Sam2Config`` for random-init use: a tiny one for tests, or SAM 2.1 Hiera-L's shape for
    throughput measurements (speed does not depend on the weights)."""
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    if tiny:
        backbone = Sam2HieraDetConfig(
            hidden_size=16,
            num_attention_heads=1,
            blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 1, 1, 1],
            window_size_per_stage=[8, 4, 4, 2],
            global_attention_blocks=[3],
            image_size=[256, 256],
            window_positional_embedding_background_size=[4, 4],
        )
        vision = Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=32,
        )
        return Sam2Config(
            vision_config=vision,
            prompt_encoder_config=Sam2PromptEncoderConfig(
                hidden_size=32, image_size=256, mask_input_channels=16
            ),
            mask_decoder_config=Sam2MaskDecoderConfig(
                hidden_size=32, iou_head_hidden_dim=32, mlp_dim=64, num_attention_heads=2
            ),
        )
    # SAM 2.1 Hiera-L: 144-wide, 2/6/36/4 blocks, global attention at blocks 23, 33, 43.
    backbone = Sam2HieraDetConfig(
        hidden_size=144,
        num_attention_heads=2,
        blocks_per_stage=[2, 6, 36, 4],
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 16, 8],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
    )
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[1152, 576, 288, 144])
    return Sam2Config(vision_config=vision)
