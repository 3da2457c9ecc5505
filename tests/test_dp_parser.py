"""The DP parser reads the FINAL score only, and gives None with a reason when it cannot."""

from __future__ import annotations

import pytest

from visa.agents.dp_parser import parse_final_score

PER_DIMENSION = (
    "1. Visual elements: score 2\n2. Detail and material: score 3\n3. Context: 2\n"
    "Final score: 4\nThe image is rich overall."
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PER_DIMENSION, 4),  # per-perspective scores come first; the final one wins
        ("Visual elements: 5/5. Detail: 5/5.\nFinal score: 2", 2),
        ("最终评分：4", 4),
        ("视觉元素：3分\n细节：2分\n最终评分：5分", 5),
        ("最终得分: ３", 3),  # full-width digit
        ("Score: 4/5", 4),
        ("Final score: 3", 3),
        ("**Final score:** **4**", 4),
        ("## Final Score\n5", 5),
        ("Final score: 4 out of 5, because the scene is busy.", 4),
        ("Final score: 2. Trailing explanation with numbers 7 and 9.", 2),
        ("Overall score = 1", 1),
        ("final score is 5", 5),
        ("Final score: 4.0", 4),
        ("4", 4),
        ("**3.**", 3),
        ("Draft final score: 2 ... after reflection, Final score: 4", 4),  # the last final marker
    ],
)
def test_reads_the_final_score(text: str, expected: int) -> None:
    parsed = parse_final_score(text)
    assert parsed.score == expected, parsed.error
    assert parsed.error is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Visual elements: score 3. Detail: score 4. Composition: score 2.", "several scores"),
        ("The image shows a cat on a sofa.", "no final score marker"),
        ("Final score: 3 or 4", "two numbers"),
        ("Final score: 3-4", "two numbers"),
        ("Final score: not sure", "no number"),
        ("Final score: 7", "outside 1-5"),
        ("Final score: 8/10", "out of 10"),
        ("Final score: 3.5", "not a whole number"),
        ("", "empty"),
        (None, "empty"),
        ("0", "outside 1-5"),
    ],
)
def test_no_score_gives_none_with_a_reason(text: str | None, reason: str) -> None:
    parsed = parse_final_score(text)
    assert parsed.score is None
    assert parsed.error is not None and reason in parsed.error


# Answer shapes of public judges: MT-Bench's single grading ("Rating: [[5]]", with "[5]" as its
# fallback), Prometheus ("Feedback: ... [RESULT] 4"), and the shapes our rubric asks for, followed by
# prose that mentions the final score again (what MLLM judges write after the score).
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final score: 4. This final score reflects the many interacting elements.", 4),
        ("Final score: [4]", 4),
        ("Final score: [[2]]", 2),
        ("Final score: (4)", 4),
        ("Rating: [[5]]", 5),
        ("The answer covers the image well. Rating: [3]", 3),
        ("Feedback: The image has a rich scene with people and signage. [RESULT] 4", 4),
        ("**Final Score: 4/5**\n\nThe final score takes the cultural context into account.", 4),
        ("### Final Score\n**5**\n\nThis final score is justified by the dense detail.", 5),
        ("最终评分：【4】", 4),
        ("The final score is 3 out of 5.", 3),
        ("Visual elements: 4\nComposition: 2\nFinal score: 3\nWhy this final score: the scene is simple.", 3),
        ("Final score: 4. After a second look I revise it. Final score: 2", 2),
    ],
)
def test_public_answer_shapes(text: str, expected: int) -> None:
    parsed = parse_final_score(text)
    assert parsed.score == expected, parsed.error
    assert parsed.error is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Final score: [4]. Rescored on reflection: final score 9.", "outside 1-5"),  # the last number decides
        ("This final score reflects the details.", "no number"),
        ("Rating: [[3]] for detail, rating: [[4]] for context.", "several scores"),
        ("My rating reflects the composition.", "no number"),
    ],
)
def test_shapes_that_stay_unreadable(text: str, reason: str) -> None:
    parsed = parse_final_score(text)
    assert parsed.score is None
    assert parsed.error is not None and reason in parsed.error
