"""Read the FINAL 1-5 score out of a judge's free-text answer.

The reference implementation's stop strings cut the final score out of the answer, so its parser
usually picked up a per-perspective score instead. Here:

1. Markdown emphasis and full-width characters are normalised (``**4**``, ``４``, ``：``).
2. If a *final* marker is present (``final score``, ``overall score``, ``final rating``,
   ``[RESULT]``, ``最终评分``, ``最终得分``, ``综合评分``, ``总评分``, ``总分``), the score is the number
   right after the **last** final marker that is followed by a number: prose that mentions the final
   score again after giving it ("This final score reflects ...") does not hide it.
3. Otherwise generic ``score``/``rating``/``评分``/``得分`` markers: when exactly one of them is followed
   by a number, that number (``Score: 4/5``, ``Rating: [[4]]``); several numbered generic markers are
   ambiguous (they are per-perspective scores) and give no score.
4. Otherwise an answer that is nothing but a number (``"4"``, ``"**4.**"``) is accepted.

The number may be written ``4``, ``[4]``, ``[[4]]``, ``(4)``, ``4/5``, ``4 out of 5``, ``4分`` or ``4.0``;
it must be a whole number from 1 to 5. A range or alternative right after the marker (``3-4``,
``3 or 4``) is ambiguous. Every failure gives ``score=None`` with a one-line reason.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

FINAL_MARKERS = re.compile(
    r"(final\s+score|overall\s+score|final\s+rating|overall\s+rating|\[result\]|最终评分|最终得分|综合评分|总评分|总分)",
    re.IGNORECASE,
)
GENERIC_MARKERS = re.compile(r"(?<![a-z])(score|rating|评分|得分)(?![a-z])", re.IGNORECASE)
NUMBER_AFTER = re.compile(
    r"^\s*(?:\((?!\s*\d+\s*\))[^)]*\)\s*)?"  # a parenthetical such as "(1-5)", but not "(4)"
    r"(?:is|of|was|[:=\-–—])?\s*(?:is\s*)?[:=]?\s*"
    r"[\[(<{【]*\s*(?P<n>\d+(?:\.\d+)?)\s*[\])>}】]*"
    r"(?P<suffix>\s*(?:/\s*\d+|out\s+of\s+\d+|分|points?)?)",
    re.IGNORECASE,
)
ALTERNATIVE = re.compile(r"^\s*(?:or|to|and|-|–|~|或|至|到)\s*\d", re.IGNORECASE)
BARE = re.compile(r"^\s*(?P<n>\d+(?:\.0+)?)\s*(?:/\s*5)?\s*[.。]?\s*$")


@dataclass(frozen=True, slots=True)
class ParsedScore:
    score: int | None
    error: str | None = None


def normalize(text: str) -> str:
    """Full-width to ASCII (NFKC, but keep the CJK markers), markdown emphasis and backticks removed."""
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"[*_`#]+", "", text)


def _number_after(text: str, position: int) -> ParsedScore | None:
    """The rating right after a marker ending at ``position``; None when no number follows it."""
    match = NUMBER_AFTER.match(text[position:])
    if match is None:
        return None
    value = float(match.group("n"))
    suffix = match.group("suffix") or ""
    denominator = re.search(r"(\d+)", suffix)
    if denominator and int(denominator.group(1)) != 5:
        return ParsedScore(None, f"score given out of {denominator.group(1)}, not out of 5")
    rest = text[position + match.end() :]
    if ALTERNATIVE.match(rest):
        return ParsedScore(None, "two numbers where one score was expected")
    if value != int(value):
        return ParsedScore(None, f"score {match.group('n')} is not a whole number")
    if not 1 <= value <= 5:
        return ParsedScore(None, f"score {int(value)} is outside 1-5")
    return ParsedScore(int(value))


def _numbered(text: str, markers: re.Pattern[str]) -> list[ParsedScore]:
    """What follows each marker that is followed by a number, in text order."""
    found = (_number_after(text, m.end()) for m in markers.finditer(text))
    return [parsed for parsed in found if parsed is not None]


def parse_final_score(text: str | None) -> ParsedScore:
    """The final score of a judgement, or ``None`` with the reason it could not be read."""
    if text is None or not text.strip():
        return ParsedScore(None, "empty answer")
    clean = normalize(text)
    if FINAL_MARKERS.search(clean):
        finals = _numbered(clean, FINAL_MARKERS)
        return finals[-1] if finals else ParsedScore(None, "no number after the score marker")
    generic = _numbered(clean, GENERIC_MARKERS)
    if len(generic) == 1:
        return generic[0]
    if len(generic) > 1:
        return ParsedScore(None, "several scores and no final score marker")
    if GENERIC_MARKERS.search(clean):
        return ParsedScore(None, "no number after the score marker")
    bare = BARE.match(clean)
    if bare:
        value = int(float(bare.group("n")))
        if 1 <= value <= 5:
            return ParsedScore(value)
        return ParsedScore(None, f"score {value} is outside 1-5")
    return ParsedScore(None, "no final score marker")
