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
