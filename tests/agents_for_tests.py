"""Small agents used by the executor tests (importable as ``agents_for_tests:Name`` in recipes)."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from visa.agents.base import Agent, AgentParams, Unit


class MeanBrightness(Agent):
    """Mean grey level; sleeps ``delay_s`` per image so tests can interrupt a run mid-way."""

    unit = Unit.IMAGE

    class Params(AgentParams):
        delay_s: float = 0.0
        scale: float = 1.0
        fail_on_dark: bool = False
        call_log: str = ""  # a file that gets the size of every scored batch (else $VISA_TEST_CALL_LOG)

    def score_batch(self, items):
        out = []
        for item in items:
            time.sleep(self.params.delay_s)
            value = float(np.asarray(item.image.convert("L")).mean()) * self.params.scale
            if self.params.fail_on_dark and value < 60:
                raise ValueError("too dark to score")  # raised for the whole batch: the executor isolates it
            out.append({"score": value})
        _count_call(len(items), self.params.call_log)
        return out


class AnswerLength(Agent):
    """Words in the assistant turns, plus the upstream brightness seen through ``needs``."""

    unit = Unit.SAMPLE
    uses_images = False
    needs = ("light.mean",)
    outputs = {"score": pa.float64(), "seen_brightness": pa.float64()}

    def score_batch(self, items):
        return [
            {
                "score": float(sum(len(t.text.split()) for t in item.turns if t.role == "assistant")),
                "seen_brightness": item.context["light.mean"],
            }
            for item in items
        ]


class Follower(Agent):
    """An image agent that reads other image agents' columns (``reads``) through ``needs``.

    ``score`` is the sum of the values it was handed plus ``offset``; ``seen`` is that sum alone. An
    image whose upstream value is missing becomes an error result.
    """

    unit = Unit.IMAGE
    outputs = {"score": pa.float64(), "seen": pa.float64()}

    class Params(AgentParams):
        reads: tuple[str, ...] = ("light.mean",)
        offset: float = 0.0

    def __init__(self, params=None):
        super().__init__(params)
        self.needs = tuple(self.params.reads)

    def score_batch(self, items):
        out = []
        for item in items:
            values = [item.context.get(column) for column in self.needs]
            if any(v is None for v in values):
                out.append(ValueError("no upstream value"))
                continue
            seen = float(sum(values))
            out.append({"score": seen + self.params.offset, "seen": seen})
        return out


def _count_call(n: int, path: str = "") -> None:
    path = path or os.environ.get("VISA_TEST_CALL_LOG", "")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{n}\n")


class SetupLog(Agent):
    """Scores nothing useful (image width), but writes ``setup_log`` in ``setup()``: where a real agent
    would load its model. Tests use it to prove that a mistake was caught before any model loaded."""

    unit = Unit.IMAGE

    class Params(AgentParams):
        setup_log: str = ""

    def setup(self) -> None:
        if self.params.setup_log:
            with open(self.params.setup_log, "a") as fh:
                fh.write("setup\n")

    def score_batch(self, items):
        return [{"score": float(item.image.width)} for item in items]


class LoadLog(Agent):
    """Image width; appends ``setup`` and ``teardown`` to ``log`` (where a model loads and is freed)."""

    unit = Unit.IMAGE

    class Params(AgentParams):
        log: str

    def setup(self) -> None:
        with open(self.params.log, "a") as fh:
            fh.write("setup\n")

    def teardown(self) -> None:
        with open(self.params.log, "a") as fh:
            fh.write("teardown\n")

    def score_batch(self, items):
        return [{"score": float(item.image.width)} for item in items]


class SlowSetup(Agent):
    """Image width, after a setup of ``delay`` seconds (a model load) that fails when ``fail`` is set.
    Scoring before the setup has finished is an error."""

    unit = Unit.IMAGE

    class Params(AgentParams):
        delay: float = 0.0
        fail: bool = False

    def __init__(self, params=None):
        super().__init__(params)
        self.loaded = False

    def setup(self) -> None:
        time.sleep(self.params.delay)
        if self.params.fail:
            raise RuntimeError("the model file is damaged")
        self.loaded = True

    def score_batch(self, items):
        if not self.loaded:
            raise RuntimeError("scored before its setup finished")
        return [{"score": float(item.image.width)} for item in items]


class MeanColour(Agent):
    """The image's mean RGB as a 3-vector (``embedding``): a stand-in for an embedding agent."""

    unit = Unit.IMAGE
    outputs = {"embedding": pa.list_(pa.float32())}

    def score_batch(self, items):
        return [
            {"embedding": np.asarray(item.image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0).tolist()}
            for item in items
        ]


class KillOnce(Agent):
    """Mean grey level, but the first process to score an image kills itself with SIGKILL (as the
    out-of-memory killer would), leaving ``marker`` behind so that a rerun goes through."""

    unit = Unit.IMAGE

    class Params(AgentParams):
        marker: str = ""

    def score_batch(self, items):
        import signal

        if self.params.marker and not os.path.exists(self.params.marker):
            open(self.params.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return [{"score": float(np.asarray(item.image.convert("L")).mean())} for item in items]
