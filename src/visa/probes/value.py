"""Agent weights that measure correctness on probes: the ``probes`` value function and its Shapley game.

A *probe set* is a list of probe rows (each with every agent's standardised value) grouped into
*ladders*: rows made from one source (an image and its degraded copies; a sample on its own image and
on other images). Within a ladder every row has a *tier*: 0 carries the most information, higher
tiers less. A pair ``(a, b)`` of rows of the same ladder with ``tier(a) < tier(b)`` is *ordered
right* by a score ``m`` when ``m(a) > m(b)``.

Value of a coalition ``S`` of agents::

    m_S(row)   = mean of the z-scored values of the agents of S on that row (nulls skipped)
    conc(S)    = mean over all probe pairs of  1[m_S(a) > m_S(b)] + 1/2 1[m_S(a) = m_S(b)]
    v(S)       = conc(S) - 1/2,           v(empty) = 0

``conc`` is the AUROC of the coalition's mean at telling the richer row of a ladder from the poorer
one, pooled over ladders (pairs never cross ladders, so an image is only compared with its own
copies). Subtracting 1/2 puts chance at zero: a pure-noise agent is worth ~0, an inverted one is
worth less than nothing. A pair whose two rows have no value at all under ``S`` counts as a tie.

Weights: the Shapley values ``phi_j`` of this game (exact for up to ``EXACT_MAX_AGENTS`` agents,
Monte Carlo permutation sampling beyond); agents with ``phi_j <= 0`` get weight 0 and are named in
``warnings``; the others get ``phi_j / sum(positive phi)``. When no agent has a positive value the
weights are equal and a warning says the probes could not rank the agents.

Intervals: ladders are resampled with replacement (``bootstrap`` draws, fixed seed); each draw's
weights are computed the same way, and the 5th and 95th percentiles are reported per agent. An
agent whose own probe AUROC interval contains 1/2 is flagged ``no_information``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visa.fusion import coalition_masks, shapley_from_table

EXACT_MAX_AGENTS = 12
DEFAULT_PERMUTATIONS = 2000
DEFAULT_BOOTSTRAP = 200
INTERVAL = (5.0, 95.0)


class ProbeValueError(ValueError):
    """The probes cannot value these agents; the message is one clear line."""


@dataclass(frozen=True)
class ProbePairs:
    """The ordered pairs of a probe set: row ``better[i]`` should score above row ``worse[i]``.

    ``ladder[i]`` is the ladder (0 .. ``n_ladders - 1``) both rows belong to; ``weight[i]`` is
    1 / (the number of pairs with the same poorer row), so that every poorer rung of a ladder
    counts once, however many richer rows it is compared with.
    """

    better: np.ndarray
    worse: np.ndarray
    ladder: np.ndarray
    n_ladders: int
    weight: np.ndarray

    @property
    def size(self) -> int:
        return int(self.better.size)


@dataclass(frozen=True)
class FamilyProbes:
    """A family's probe rows: one float64 array per agent (same order as the family's agents), the
    ordered probe pairs, and ``direction`` (+1 when higher = more information, -1 for e.g. PT)."""

    columns: Sequence[np.ndarray]
    pairs: ProbePairs
    direction: float = 1.0
    bootstrap: int = DEFAULT_BOOTSTRAP


def ladder_pairs(
    ladders: Sequence[Any] | np.ndarray,
    tiers: Sequence[int] | np.ndarray,
    chains: Sequence[str] | np.ndarray | None = None,
    *,
    balanced: bool = True,
    across: Sequence[bool] | np.ndarray | None = None,
) -> ProbePairs:
    """The ordered pairs of rows of the same ladder whose tiers differ, the lower tier first.

    ``ladders``: any id per row; ``tiers``: 0 = most information. ``chains`` (optional) make the
    order partial: two rows are compared only when they are on the same chain or when either has
    the empty chain ``""`` (the source itself and the bottom of the ladder compare with everything),
    so that e.g. a crop is compared with a smaller crop but not with a blurred copy. Ladder ids are
    renumbered 0 .. n-1 in order of first appearance. With ``balanced`` (default) each pair weighs
    1 / (the pairs of its poorer row): a flat copy, below every other rung, would otherwise hold most
    pairs of an image ladder and decide the game alone; without it every pair weighs 1.

    ``across`` (optional, one flag per row) adds pairs that cross ladders: every flagged row is
    also the poorer row of a pair with the source (tier 0) of every *other* ladder. A score that
    ranks a whole pool must put any source above another image's degraded copy, not only above its
    own; such a pair belongs to the poorer row's ladder (for the bootstrap).
    """
    ladders = np.asarray(ladders)
    tiers = np.asarray(tiers, dtype=np.int64)
    chain = np.asarray(chains if chains is not None else [""] * tiers.size, dtype=object)
    if ladders.shape != tiers.shape or chain.shape != tiers.shape:
        raise ProbeValueError("ladder ids, tiers and chains must have the same length")
    _, first, codes = np.unique(ladders, return_index=True, return_inverse=True)
    renumber = np.empty(first.size, dtype=np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(first.size)
    codes = renumber[codes.reshape(-1)]
    better: list[np.ndarray] = []
    worse: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    for code in range(first.size):
        rows = np.flatnonzero(codes == code)
        a, b = np.meshgrid(rows, rows, indexing="ij")
        ok = (tiers[a] < tiers[b]) & ((chain[a] == chain[b]) | (chain[a] == "") | (chain[b] == ""))
        better.append(a[ok])
        worse.append(b[ok])
        owner.append(np.full(int(ok.sum()), code, dtype=np.int64))
    if across is not None:
        flagged = np.asarray(across, dtype=bool)
        if flagged.shape != tiers.shape:
            raise ProbeValueError("one 'across' flag per row is needed")
        sources = np.flatnonzero(tiers == 0)
        for row in np.flatnonzero(flagged & (tiers > 0)):
            others = sources[codes[sources] != codes[row]]
            better.append(others)
            worse.append(np.full(others.size, row, dtype=np.int64))
            owner.append(np.full(others.size, codes[row], dtype=np.int64))
    worse_rows = _cat(worse)
    per_row = np.bincount(worse_rows, minlength=tiers.size).astype(np.float64)
    weight = 1.0 / per_row[worse_rows] if balanced else np.ones(worse_rows.size)
    return ProbePairs(_cat(better), worse_rows, _cat(owner), int(first.size), weight)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Coalition scores on the probe pairs
# ---------------------------------------------------------------------------------------------
def _coalition_means(z: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean of the agents of each coalition (rows of ``masks``) on every probe row, nulls skipped.

    ``z``: probe rows x agents (NaN = null). Returns coalitions x rows (NaN where no agent has a value).
    """
    present = ~np.isnan(z)
    filled = np.where(present, z, 0.0)
    total = masks @ filled.T
    count = masks @ present.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    out[count == 0] = np.nan
    return out


def _pair_scores(means: np.ndarray, pairs: ProbePairs) -> np.ndarray:
    """coalitions x pairs: +1 ordered right, -1 wrong, 0 tie or no value; halved later into concordance."""
    diff = means[:, pairs.better] - means[:, pairs.worse]
    out = np.sign(diff)
    out[np.isnan(diff)] = 0.0
    return out


def _ladder_sums(pair_scores: np.ndarray, pairs: ProbePairs) -> tuple[np.ndarray, np.ndarray]:
    """Per coalition and ladder: the sum of pair scores, and the pair count per ladder."""
    sums = np.zeros((pair_scores.shape[0], pairs.n_ladders))
    for k in range(pair_scores.shape[0]):
        sums[k] = np.bincount(pairs.ladder, weights=pair_scores[k] * pairs.weight, minlength=pairs.n_ladders)
    counts = np.bincount(pairs.ladder, weights=pairs.weight, minlength=pairs.n_ladders)
    return sums, counts


def _values(sums: np.ndarray, counts: np.ndarray, ladder_weights: np.ndarray) -> np.ndarray:
    """v per coalition = concordance - 1/2 = (mean pair score) / 2, ladders weighted by ``ladder_weights``."""
    pairs = float(counts @ ladder_weights)
    if pairs <= 0:
        return np.zeros(sums.shape[0])
    return (sums @ ladder_weights) / pairs / 2.0


# ---------------------------------------------------------------------------------------------
# The game
# ---------------------------------------------------------------------------------------------
class ProbeGame:
    """The probe game of ``z`` (probe rows x agents, standardised, NaN = null) over ``pairs``.

    Exact games (``n <= exact_max_agents``) precompute every coalition's per-ladder sums once, so
    a bootstrap draw costs one matrix product. Larger games sample permutations.
    """

    def __init__(
        self,
        z: np.ndarray,
        pairs: ProbePairs,
        *,
        exact_max_agents: int = EXACT_MAX_AGENTS,
        permutations: int = DEFAULT_PERMUTATIONS,
        seed: int = 0,
    ):
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2:
            raise ProbeValueError("probe values must be a rows x agents matrix")
        self.z, self.pairs = z, pairs
        self.n = z.shape[1]
        self.exact = self.n <= exact_max_agents
        self.permutations = permutations
        self.seed = seed
        self._sums: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        if self.exact and self.n:
            masks = coalition_masks(self.n)
            self._sums, self._counts = _ladder_sums(_pair_scores(_coalition_means(z, masks), pairs), pairs)

    def singles(self, ladder_weights: np.ndarray | None = None) -> np.ndarray:
        """Each agent's own probe AUROC (concordance) under ``ladder_weights`` (default: all ladders once)."""
        w = self._weights(ladder_weights)
        if self._sums is not None:
            return _values(self._sums[[1 << j for j in range(self.n)]], self._counts, w) + 0.5
        masks = np.eye(self.n)
        sums, counts = _ladder_sums(_pair_scores(_coalition_means(self.z, masks), self.pairs), self.pairs)
        return _values(sums, counts, w) + 0.5

    def shapley(self, ladder_weights: np.ndarray | None = None) -> np.ndarray:
        """Shapley values of the agents (sum = v(all agents))."""
        if self.n == 0:
            return np.zeros(0)
        w = self._weights(ladder_weights)
        if self._sums is not None:
            return shapley_from_table(_values(self._sums, self._counts, w), self.n)
        return self._sampled(w)

    def _weights(self, ladder_weights: np.ndarray | None) -> np.ndarray:
        if ladder_weights is None:
            return np.ones(self.pairs.n_ladders)
        return np.asarray(ladder_weights, dtype=np.float64)

    def _sampled(self, w: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        phi = np.zeros(self.n)
        for _ in range(self.permutations):
            order = rng.permutation(self.n)
            masks = np.zeros((self.n + 1, self.n))
            for k, j in enumerate(order):
                masks[k + 1 :, j] = 1.0
            sums, counts = _ladder_sums(_pair_scores(_coalition_means(self.z, masks), self.pairs), self.pairs)
            v = _values(sums, counts, w)
            v[0] = 0.0
            phi[order] += np.diff(v)
        return phi / self.permutations


def weights_from_shapley(phi: np.ndarray) -> tuple[np.ndarray, bool]:
    """Positive Shapley values normalised to sum 1 (the rest 0); ``(equal weights, False)`` if none is positive."""
    positive = np.where(phi > 0, phi, 0.0)
    total = float(positive.sum())
    if total <= 0:
        return np.full(phi.size, 1.0 / max(phi.size, 1)), False
    return positive / total, True


def probe_weights(
    z: np.ndarray,
    pairs: ProbePairs,
    agents: Sequence[str],
    *,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    exact_max_agents: int = EXACT_MAX_AGENTS,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> dict[str, Any]:
    """Weights of ``agents`` (columns of ``z``) under the probe game, with bootstrap intervals.

    Returns a JSON-able dict: ``weights``, ``shapley``, ``probe_auroc``, ``interval`` (weight, 5-95%),
    ``auroc_interval``, ``no_information`` (agents whose AUROC interval holds 1/2), ``zero_weight``
    (agents with Shapley value <= 0), ``warnings``, ``pairs``, ``ladders``, ``bootstrap``, ``exact``.
    """
    agents = list(agents)
    if z.shape[1] != len(agents):
        raise ProbeValueError("one probe column per agent is needed")
    if pairs.size == 0:
        raise ProbeValueError("the probes hold no ordered pair (every ladder has a single tier)")
    game = ProbeGame(z, pairs, exact_max_agents=exact_max_agents, permutations=permutations, seed=seed)
    phi = game.shapley()
    weights, informative = weights_from_shapley(phi)
    auroc = game.singles()
    draws_w, draws_a = _bootstrap(game, bootstrap, seed)
    warnings: list[str] = []
    zero = [a for a, p in zip(agents, phi, strict=True) if p <= 0]
    if not informative:
        warnings.append("no agent orders the probes better than chance: equal weights")
    elif zero:
        warnings.append(
            "weight 0 (its probe contribution is not positive): "
            + ", ".join(f"{a} (probe AUROC {auroc[agents.index(a)]:.2f})" for a in zero)
        )
    report: dict[str, Any] = {
        "weights": _named(agents, weights),
        "shapley": _named(agents, phi),
        "probe_auroc": _named(agents, auroc),
        "pairs": pairs.size,
        "ladders": pairs.n_ladders,
        "bootstrap": int(bootstrap),
        "exact": game.exact,
        "zero_weight": zero,
        "warnings": warnings,
    }
    if draws_w is not None:
        lo_w, hi_w = np.percentile(draws_w, INTERVAL, axis=0)
        lo_a, hi_a = np.percentile(draws_a, INTERVAL, axis=0)
        report["interval"] = {a: [_r(lo_w[j]), _r(hi_w[j])] for j, a in enumerate(agents)}
        report["auroc_interval"] = {a: [_r(lo_a[j]), _r(hi_a[j])] for j, a in enumerate(agents)}
        report["no_information"] = [a for j, a in enumerate(agents) if lo_a[j] <= 0.5 <= hi_a[j]]
    else:
        report["no_information"] = [a for j, a in enumerate(agents) if abs(auroc[j] - 0.5) < 1e-12]
    return report


def _bootstrap(game: ProbeGame, draws: int, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Weights and single-agent AUROCs over ``draws`` resamples of the ladders (None when draws < 2)."""
    if draws < 2 or game.pairs.n_ladders < 2:
        return None, None
    rng = np.random.default_rng(seed + 1)
    n_ladders = game.pairs.n_ladders
    weights = np.empty((draws, game.n))
    aurocs = np.empty((draws, game.n))
    for d in range(draws):
        counts = np.bincount(rng.integers(0, n_ladders, n_ladders), minlength=n_ladders).astype(np.float64)
        weights[d] = weights_from_shapley(game.shapley(counts))[0]
        aurocs[d] = game.singles(counts)
    return weights, aurocs


def _r(x: float) -> float | None:
    return None if not math.isfinite(float(x)) else round(float(x), 4)


def _named(agents: Sequence[str], values: np.ndarray) -> dict[str, float | None]:
    return {a: _r(values[j]) for j, a in enumerate(agents)}


def concordance(values: np.ndarray, pairs: ProbePairs) -> float:
    """The probe AUROC of one score column (NaN = null): share of pairs ordered right, ties half."""
    values = np.asarray(values, dtype=np.float64)
    if pairs.size == 0:
        return float("nan")
    scores = _pair_scores(values[None, :], pairs)[0]
    return float(np.average(scores, weights=pairs.weight) / 2.0 + 0.5)
