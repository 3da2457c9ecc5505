"""The probe value function: synthetic agents whose quality is known get weights in that order."""

from __future__ import annotations

import numpy as np
import pytest

from visa.probes.value import (
    ProbeGame,
    ProbeValueError,
    concordance,
    ladder_pairs,
    probe_weights,
)


def _ladders(n_ladders: int = 40, tiers: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``n_ladders`` ladders with ``tiers`` rungs each, and a true information level per row."""
    rng = np.random.default_rng(0)
    ladder = np.repeat(np.arange(n_ladders), tiers)
    tier = np.tile(np.arange(tiers), n_ladders)
    # the source's own level varies a lot between ladders; each rung removes information
    truth = rng.normal(0, 3, n_ladders)[ladder] - 1.0 * tier
    return ladder, tier, truth


def _z(columns: list[np.ndarray]) -> np.ndarray:
    z = np.column_stack(columns)
    return (z - z.mean(axis=0)) / z.std(axis=0)


def test_pairs_partial_order() -> None:
    pairs = ladder_pairs(["a", "a", "a", "a", "b", "b"], [0, 1, 2, 3, 0, 1], ["", "x", "y", "", "", "x"])
    got = {(int(b), int(w)) for b, w in zip(pairs.better, pairs.worse, strict=True)}
    # row 1 (chain x) and row 2 (chain y) are not compared; the source and the bottom compare with all
    assert got == {(0, 1), (0, 2), (0, 3), (1, 3), (2, 3), (4, 5)}
    assert pairs.n_ladders == 2
    assert list(pairs.ladder) == [0, 0, 0, 0, 0, 1]


def test_weights_order_good_noisy_inverted_constant() -> None:
    ladder, tier, truth = _ladders()
    rng = np.random.default_rng(1)
    good = truth + rng.normal(0, 0.3, truth.size)
    weak = truth + rng.normal(0, 3.0, truth.size)
    noise = rng.normal(0, 1, truth.size)
    inverted = -truth + rng.normal(0, 0.3, truth.size)
    constant = np.zeros(truth.size)
    z = np.column_stack([*_z([good, weak, noise, inverted]).T, constant])
    report = probe_weights(
        z, ladder_pairs(ladder, tier), ["good", "weak", "noise", "inverted", "constant"], bootstrap=50
    )
    w = report["weights"]
    assert w["good"] > w["weak"] > 0
    assert w["good"] > 0.5
    assert w["inverted"] == 0.0 and w["constant"] == 0.0
    assert w["noise"] < 0.1
    assert abs(sum(w.values()) - 1) < 1e-3
    assert "inverted" in report["zero_weight"] and "constant" in report["zero_weight"]
    assert any("inverted" in line for line in report["warnings"])
    auroc = report["probe_auroc"]
    assert auroc["good"] > 0.9 and auroc["inverted"] < 0.1 and auroc["constant"] == 0.5
    assert "constant" in report["no_information"] and "noise" in report["no_information"]
    assert "good" not in report["no_information"] and "inverted" not in report["no_information"]
    lo, hi = report["interval"]["good"]
    assert lo <= w["good"] <= hi


def test_consensus_trap_two_agents() -> None:
    """The case the Pearson value cannot resolve (two agents: always 0.5 / 0.5) is resolved here."""
    ladder, tier, truth = _ladders()
    rng = np.random.default_rng(2)
    z = _z([truth + rng.normal(0, 0.2, truth.size), rng.normal(0, 1, truth.size)])
    report = probe_weights(z, ladder_pairs(ladder, tier), ["real", "noise"], bootstrap=20)
    assert report["weights"]["real"] > 0.85


def test_duplicated_agents_share_equally() -> None:
    ladder, tier, truth = _ladders()
    rng = np.random.default_rng(3)
    good = truth + rng.normal(0, 0.5, truth.size)
    other = truth + rng.normal(0, 1.5, truth.size)
    z = _z([good, good.copy(), other])
    report = probe_weights(z, ladder_pairs(ladder, tier), ["a", "a_copy", "b"], bootstrap=0)
    w = report["weights"]
    assert w["a"] == pytest.approx(w["a_copy"])
    assert w["a"] > w["b"] > 0


def test_nothing_informative_gives_equal_weights_with_warning() -> None:
    ladder, tier, truth = _ladders()
    z = _z([-truth, -truth * 2 + 0.1])
    report = probe_weights(z, ladder_pairs(ladder, tier), ["x", "y"], bootstrap=0)
    assert report["weights"] == {"x": 0.5, "y": 0.5}
    assert report["warnings"] and "chance" in report["warnings"][0]


def test_efficiency_and_sampled_agrees_with_exact() -> None:
    ladder, tier, truth = _ladders(20)
    rng = np.random.default_rng(4)
    z = _z([truth + rng.normal(0, s, truth.size) for s in (0.5, 1, 2, 4)])
    pairs = ladder_pairs(ladder, tier)
    exact = ProbeGame(z, pairs).shapley()
    v_all = concordance(z.mean(axis=1), pairs) - 0.5
    assert exact.sum() == pytest.approx(v_all)
    sampled = ProbeGame(z, pairs, exact_max_agents=2, permutations=400, seed=0).shapley()
    assert np.abs(sampled - exact).max() < 0.02


def test_nulls_are_skipped_in_the_mean() -> None:
    pairs = ladder_pairs([0, 0, 1, 1], [0, 1, 0, 1])
    z = np.array([[1.0, np.nan], [0.0, np.nan], [np.nan, 2.0], [np.nan, 1.0]])
    game = ProbeGame(z, pairs)
    # the coalition of both agents orders both pairs right, each agent alone one pair (other: tie)
    assert game.singles().tolist() == [0.75, 0.75]
    assert game.shapley().sum() == pytest.approx(0.5)


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(ProbeValueError):
        probe_weights(np.zeros((2, 1)), ladder_pairs([0, 1], [0, 0]), ["a"])


def test_each_poorer_rung_counts_once() -> None:
    # source > crop (chain "crop") > flat (the bottom, compared with both): the flat copy is the
    # poorer row of two pairs, each weighing 1/2, so it counts as much as the crop
    pairs = ladder_pairs([0, 0, 0], [0, 1, 3], ["", "crop", ""])
    got = {(int(b), int(w)): float(x) for b, w, x in zip(pairs.better, pairs.worse, pairs.weight, strict=True)}
    assert got == {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.5}
    assert ladder_pairs([0, 0, 0], [0, 1, 3], ["", "crop", ""], balanced=False).weight.tolist() == [1.0, 1.0, 1.0]
    # an agent that only tells the flat copy apart orders half of the ladder's weight, not two thirds
    flat_only = np.array([1.0, 1.0, 0.0])
    assert concordance(flat_only, pairs) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)


def test_pairs_across_ladders() -> None:
    # rows 1 and 3 are degraded copies: each is also below the source of the other ladder
    pairs = ladder_pairs([0, 0, 1, 1, 1], [0, 1, 0, 1, 2], ["", "x", "", "x", "crop"], across=[0, 1, 0, 1, 0])
    got = {(int(b), int(w)): int(o) for b, w, o in zip(pairs.better, pairs.worse, pairs.ladder, strict=True)}
    # within: (0,1), (2,3), (2,4); across: source 2 above row 1 (owned by row 1's ladder 0), source 0 above row 3
    assert got == {(0, 1): 0, (2, 3): 1, (2, 4): 1, (2, 1): 0, (0, 3): 1}
    with pytest.raises(ProbeValueError):
        ladder_pairs([0, 0], [0, 1], across=[True])


def test_pairs_across_ladders_value_a_score_over_the_whole_pool() -> None:
    # "own" orders every ladder perfectly, but its level shifts from image to image, so a degraded
    # copy of one image often outranks another image; "pooled" misorders some rungs of a ladder but
    # keeps every source above the degraded copies of any image. Within ladders alone the first
    # looks better; with the pairs across ladders the second does, as ranking a pool needs.
    rng = np.random.default_rng(3)
    n, tiers = 30, 4
    ladder = np.repeat(np.arange(n), tiers)
    tier = np.tile(np.arange(tiers), n)
    own = rng.normal(0, 3, n)[ladder] - tier
    pooled = -2.0 * tier + rng.normal(0, 1.2, tier.size)
    z = _z([own, pooled])
    within = probe_weights(z, ladder_pairs(ladder, tier, balanced=False), ["own", "pooled"], bootstrap=0)
    assert within["probe_auroc"]["own"] == pytest.approx(1.0)
    assert within["weights"]["own"] > within["weights"]["pooled"]
    across = ladder_pairs(ladder, tier, balanced=False, across=tier > 0)
    both = probe_weights(z, across, ["own", "pooled"], bootstrap=0)
    assert both["weights"]["pooled"] > both["weights"]["own"]
    assert concordance(pooled, across) > concordance(own, across)
