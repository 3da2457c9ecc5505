"""Text in the image: RapidOCR (PP-OCRv4 ONNX models shipped inside ``rapidocr-onnxruntime``).

An SC agent: rendered text is a visual element the reference segmenter also splits into many masks
(documents, charts, signs, screenshots). ``score`` is the number of text lines (boxes) found after
the reference resize.

With ``recognize: true`` (the default) each detected box is also read, boxes whose recognition
confidence is below ``min_text_score`` are dropped, and the recognised lines are returned as ``text``
(joined by newlines, truncated to ``max_text_chars``) for the language agents that verbalise the image.
With ``recognize: false`` only the detector runs, ``score`` counts raw detector boxes and ``text`` is
null. The text-orientation classifier is not run (upside-down text is rare in instruction data).

Settings, measured on the 19 bundled photos (one core of the shared 2-core development machine):

| detector input | recognition | s/img | boxes on the 17 photos other than page/text | page.png |
|---|---|---:|---|---|
| short side raised to 736 (RapidOCR default) | no | 1.12 | 18 (fur, coin rims, ...) | 4 lines |
| short side raised to 736 | yes, score >= 0.5 | 1.09 | 1 ("COMO HOPPE") | 4 lines, words run together |
| **native size (long side <= 2000)** | no | 0.17 | 4 | 5 lines |
| **native size** | yes, score >= 0.5 | 0.27 | 2 ("(R)" 0.66, "O" 0.56) | 5 lines, read correctly |

So the detector sees the image at its own size (``det_limit_type: max``: only images longer than
2000 px shrink, to ``max_side``): 4-6x faster, and it reads the bundled page better than
the upscaled default. Real lines on the page are read with confidence 0.93-0.99 and the spurious
single characters on photos with 0.56-0.66, hence ``min_text_score`` 0.7. ``det_limit_type: min``
restores RapidOCR's upscaling for collections of small scans.

Threads: ONNX Runtime uses ``OMP_NUM_THREADS`` intra-op threads when that variable is set, else its
default (all cores).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, MissingDependency, PerImageAgent, Unit
from visa.agents.resize import reference_resize


class OcrTextParams(AgentParams):
    recognize: bool = Field(True, description="read the text (needed by language agents); else count boxes")
    min_text_score: float = Field(0.7, ge=0, le=1, description="drop boxes read with lower confidence")
    box_threshold: float = Field(0.5, ge=0, le=1, description="detector box score threshold")
    max_side: int = Field(2000, ge=64, description="images are shrunk to this long side before detection")
    det_limit_type: Literal["max", "min"] = Field(
        "max", description="max: detect at native size (capped); min: raise the short side to det_limit_side"
    )
    det_limit_side: int = Field(736, ge=32, description="short side for det_limit_type 'min'")
    max_text_chars: int = Field(500, ge=0, description="truncate the returned text to this many characters")


class OcrTextAgent(PerImageAgent):
    """SC: number of text lines (RapidOCR); also the recognised text for the language agents."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = OcrTextParams
    outputs: ClassVar[dict[str, pa.DataType]] = {
        "score": pa.float64(),
        "text": pa.string(),
        "text_chars": pa.int32(),
    }
    requires: ClassVar[dict[str, str]] = {"rapidocr_onnxruntime": "embedded"}
    params: OcrTextParams

    def setup(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise MissingDependency("rapidocr-onnxruntime", "embedded", "the ocr_text agent") from None
        options: dict[str, Any] = {
            "print_verbose": False,
            "max_side_len": self.params.max_side,
            "text_score": self.params.min_text_score,
            "det_box_thresh": self.params.box_threshold,
            "det_limit_type": self.params.det_limit_type,
            "det_limit_side_len": self.params.det_limit_side,
        }
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            options["intra_op_num_threads"] = int(threads)
            options["inter_op_num_threads"] = 1
        self._engine = RapidOCR(**options)

    def teardown(self) -> None:
        self._engine = None

    def models(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"ocr": f"rapidocr-onnxruntime=={version('rapidocr-onnxruntime')} (PP-OCRv4 det/rec)"}

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        return self.read(image)

    def read(self, image) -> dict[str, Any]:
        """Count (and read) the text lines of one PIL image."""
        rgb = np.asarray(reference_resize(image.convert("RGB")))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # RapidOCR takes OpenCV's channel order for arrays
        recognize = self.params.recognize
        found, _elapsed = self._engine(bgr, use_det=True, use_cls=False, use_rec=recognize)
        found = found or []
        if not recognize:
            return {"score": float(len(found)), "text": None, "text_chars": None}
        lines = [str(entry[1]).strip() for entry in found]
        text = "\n".join(line for line in lines if line)
        return {
            "score": float(len(found)),
            "text": text[: self.params.max_text_chars],
            "text_chars": len(text),
        }
