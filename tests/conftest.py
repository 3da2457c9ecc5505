from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXAMPLES = ROOT / "examples"

if str(TESTS) not in sys.path:  # so recipes can name "agents_for_tests:Class"
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def examples() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def photos() -> list:
    """The bundled example photos (``examples/images``), decoded to RGB, in file-name order."""
    from PIL import Image

    out = []
    for path in sorted(p for p in (EXAMPLES / "images").iterdir() if p.suffix in {".jpg", ".png"}):
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    assert len(out) >= 15
    return out
