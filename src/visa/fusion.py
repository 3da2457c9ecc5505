"""Shapley fusion of the agents that measure one score.

For a score family (e.g. ``sc`` measured by ``sc.felzenszwalb`` and ``sc.ocr_text``) the agents are
players in a cooperative game whose value function is

    v(S) = Pearson(mean of the z-scored agents in S, mean of all z-scored agents),   v(empty) = 0.

Each agent's Shapley value ``phi_j`` measures how much it contributes to the consensus; its weight is
``w_j = phi_j / sum(phi)`` (``sum(phi) = v(all) = 1`` by efficiency) and the fused score of a row is
``sum_j w_j * z_j``.

Choices made here (METHOD.md "Fusion", marked "our choice" there):

* **Calibration set.** Weights and standardisation come from a calibration sample of at most
  ``calibration_size`` (default 1000) rows drawn uniformly at random with a fixed ``seed`` among rows
  with no error on which every usable agent of the family has a value. Image-level families
  (``sc``, ``oa``, ``dp`` by default) are calibrated over **unique images** (the first error-free row
  of each ``image_key``), so an image shared by many samples counts once.
* **Standardisation.** Each agent is z-scored with the mean and standard deviation (ddof=1) of its
  values on the calibration sample; the same transform is applied to every row. With z-scored
  agents the covariance matrix on the calibration sample is their Pearson matrix ``R``, and every
  ``v(S)`` follows from ``R`` alone: ``v(S) = 1_S' R 1 / sqrt(1_S' R 1_S * 1' R 1)``.
* **Exact or sampled.** Exact enumeration of all subsets for up to ``exact_max_agents`` (12) agents;
  beyond that Monte Carlo permutation sampling (``permutations`` draws, fixed seed) with the
  standard error of every weight reported.
* **Degenerate agents.** An agent with no value on any error-free row ("all null") or with a single
  distinct value ("constant") gets weight 0 and is listed under ``excluded``; the game is played by
  the others. A family with one usable agent gives it weight 1.
* **Nulls at fusion time.** A row on which some agents are null is fused over the agents it has,
  with their weights renormalised to sum to 1 (``sum_j w_j z_j / sum_j w_j`` over available ``j``). A
  row with no usable agent, or whose available weights sum to <= 0 (possible only with negative
  Shapley values), gets a null fused score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visa.families import UNITS, default_unit, families_from_columns, spec

if TYPE_CHECKING:
    from visa.probes.value import FamilyProbes

EXACT_MAX_AGENTS = 12
DEFAULT_PERMUTATIONS = 2000
#: Value functions of the Shapley game: the paper's Pearson consistency, or correctness on probes.
VALUES = ("probes", "consensus")


class FusionError(ValueError):
    """Fusion cannot run on this input; the message is one clear line."""


# ---------------------------------------------------------------------------------------------
# Shapley values of the Pearson game
# ---------------------------------------------------------------------------------------------
def _values_of_masks(masks: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """v(S) for every row of ``masks`` (k x n, 0/1) under the Pearson game on ``corr``."""
    total = float(corr.sum())
    num = masks @ corr.sum(axis=1)
    var = np.einsum("si,ij,sj->s", masks, corr, masks)
    out = np.zeros(len(masks))
    ok = (var > 1e-12 * max(abs(total), 1.0)) & (total > 0)
    out[ok] = num[ok] / np.sqrt(var[ok] * total)
    return out


def coalition_masks(n: int) -> np.ndarray:
    """Every coalition of ``n`` players as a 0/1 row, row ``i`` being the subset with bitmask ``i``."""
    ids = np.arange(1 << n)
    return ((ids[:, None] >> np.arange(n)) & 1).astype(np.float64)


def shapley_from_table(v: np.ndarray, n: int) -> np.ndarray:
    """Exact Shapley values of a game given by ``v`` indexed by subset bitmask (``v[0]``: the empty one)."""
    ids = np.arange(1 << n)
    sizes = np.array([bin(i).count("1") for i in ids])
    # weight of a coalition S (not containing j) of size s: s! (n - s - 1)! / n!
    coef = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    phi = np.empty(n)
    for j in range(n):
        without = ids[(ids >> j) & 1 == 0]
        phi[j] = float(np.sum(coef[sizes[without]] * (v[without | (1 << j)] - v[without])))
    return phi


def shapley_exact(corr: np.ndarray) -> np.ndarray:
    """Exact Shapley values of the Pearson game over the agents of correlation matrix ``corr``."""
    n = corr.shape[0]
    if n == 0:
        return np.zeros(0)
    return shapley_from_table(_values_of_masks(coalition_masks(n), corr), n)


def shapley_sampled(
    corr: np.ndarray, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo Shapley values by permutation sampling: (estimates, standard errors).

    Every sampled permutation adds the agents one at a time; an agent's marginal contribution is the
    change of v when it joins. The estimate is the mean marginal contribution over permutations and
    its standard error is the sample standard deviation over sqrt(permutations).
    """
    n = corr.shape[0]
    if permutations < 2:
        raise FusionError("Monte Carlo Shapley needs at least 2 permutations")
    rng = np.random.default_rng(seed)
    total = float(corr.sum())
    row_sums = corr.sum(axis=1)
    sums = np.zeros(n)
    squares = np.zeros(n)
    done = 0
    while done < permutations:
        size = min(batch, permutations - done)
        perm = np.argsort(rng.random((size, n)), axis=1)
        num = np.cumsum(row_sums[perm], axis=1)
        block = corr[perm[:, :, None], perm[:, None, :]]
        var = np.diagonal(block.cumsum(axis=1).cumsum(axis=2), axis1=1, axis2=2)
        v = np.zeros_like(num)
        ok = (var > 1e-12 * max(abs(total), 1.0)) & (total > 0)
        v[ok] = num[ok] / np.sqrt(var[ok] * total)
        marginal = np.diff(v, axis=1, prepend=0.0)
        contrib = np.zeros((size, n))
        np.put_along_axis(contrib, perm, marginal, axis=1)
        sums += contrib.sum(axis=0)
        squares += (contrib**2).sum(axis=0)
        done += size
    mean = sums / permutations
    var_est = np.maximum(squares / permutations - mean**2, 0.0) * permutations / (permutations - 1)
    return mean, np.sqrt(var_est / permutations)


# ---------------------------------------------------------------------------------------------
# Families and calibration
# ---------------------------------------------------------------------------------------------
def score_families(schema: pa.Schema) -> dict[str, list[str]]:
    """``{family: [agent columns]}`` from numeric ``<family>.<agent>`` columns that are scores
    (:func:`visa.families.families_from_columns`: no ``meta.*``, no descriptive family)."""
    return families_from_columns(
        (f.name, pa.types.is_floating(f.type) or pa.types.is_integer(f.type)) for f in schema
    )


def _as_float(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if not (
        pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)
    ):
        raise FusionError(f"score column of type {column.type} is not numeric")
    array = column if column.type == pa.float64() else column.cast(pa.float64())
    values = array.to_numpy() if isinstance(array, pa.ChunkedArray) else array.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)


def _error_free(table: pa.Table) -> np.ndarray:
    if "error_kind" not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    return np.asarray(pc.is_null(table.column("error_kind")).to_numpy(zero_copy_only=False), dtype=bool)


def unique_image_rows(table: pa.Table, eligible: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
    """Positions of the first eligible row of each distinct non-null ``image_key`` (ascending).

    ``codes`` are the table's :func:`image_codes` when the caller already has them.
    """
    if codes is None:
        if "image_key" not in table.column_names:
            raise FusionError("an image-level family needs the 'image_key' column")
        codes = image_codes(table)
    keep = eligible & (codes >= 0)
    positions = np.flatnonzero(keep)
    if positions.size == 0:
        return positions
    first = np.full(int(codes.max()) + 1, table.num_rows, dtype=np.int64)
    np.minimum.at(first, codes[positions], positions)
    return np.sort(first[first < table.num_rows])


def unique_image_count(table: pa.Table) -> int:
    """The one definition of "unique images" in run.json, summaries and the report: distinct
    ``image_key`` values over the rows without an error. A multi-image sample's set of images counts
    as one, as it does in fusion and in the selection's image stage (``image_keep``)."""
    if "image_key" not in table.column_names:
        return 0
    keys = table.column("image_key")
    if "error_kind" in table.column_names:
        keys = keys.filter(pc.is_null(table.column("error_kind")))
    return int(pc.count_distinct(keys, mode="only_valid").as_py())


def image_codes(table: pa.Table) -> np.ndarray:
    """Integer code per row for ``image_key`` (first-appearance order), -1 for null."""
    encoded = pc.dictionary_encode(table.column("image_key")).combine_chunks()
    indices = encoded.indices.fill_null(-1)
    return np.asarray(indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def fuse_family(
    columns: Sequence[np.ndarray],
    agents: list[str],
    calibration_pool: np.ndarray,
    *,
    calibration_size: int = 1000,
    seed: int = 0,
    exact_max_agents: int = EXACT_MAX_AGENTS,
    permutations: int = DEFAULT_PERMUTATIONS,
    probes: FamilyProbes | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fuse one family.

    ``columns``: one float64 array per agent (NaN = null), all of the same length.
    ``calibration_pool``: positions of the rows that may be drawn for calibration (error-free;
    unique images for image-level families). ``probes``: the family's probe rows; when given, the
    weights come from the probe value (:mod:`visa.probes.value`) instead of the consensus value,
    with the agents standardised by the same calibration transform. Returns the fused score per
    row (NaN = null) and the JSON-able report of the family.
    """
    n_agents = len(agents)
    n_rows = len(columns[0]) if columns else 0
    usable, excluded = _usable_agents(columns, agents, calibration_pool)
    report: dict[str, Any] = {
        "agents": list(agents),
        "weights": {name: 0.0 for name in agents},
        "exact": True,
        "calibration_size": 0,
        "calibration_pool": 0,
        "seed": seed,
        "pearson": [[None] * n_agents for _ in range(n_agents)],
        "standardisation": {},
        "excluded": excluded,
    }
    usable, sample, complete_rows = _calibration_sample(
        columns, agents, usable, calibration_pool, calibration_size, seed, excluded
    )
    report["calibration_pool"] = int(complete_rows.size) if usable else 0
    report["calibration_size"] = len(sample) if usable else 0

    if not usable:
        report["note"] = "no usable agent: the fused score is null"
        return np.full(n_rows, np.nan), report
    if len(sample) < 2:
        # No two rows have every usable agent: standardise each agent on its own values, equal weights.
        mean = np.array([np.nanmean(columns[j][calibration_pool]) for j in usable])
        std = np.array([_nanstd(columns[j][calibration_pool]) for j in usable])
        weights = np.full(len(usable), 1.0 / len(usable))
        report["note"] = "fewer than 2 rows where every agent has a value: equal weights"
    else:
        mean = sample.mean(axis=0)
        std = sample.std(axis=0, ddof=1)
        weights = _shapley_weights(sample, agents, usable, report, exact_max_agents, permutations, seed)

    weights = _value_weights(probes, usable, agents, mean, std, weights, report, seed, len(sample))
    for k, j in enumerate(usable):
        report["weights"][agents[j]] = float(weights[k])
        report["standardisation"][agents[j]] = {"mean": float(mean[k]), "std": float(std[k])}
    z_columns = [(columns[j] - mean[k]) / std[k] for k, j in enumerate(usable)]
    return renormalised_sum(z_columns, weights), report


def _usable_agents(
    columns: Sequence[np.ndarray], agents: list[str], pool: np.ndarray
) -> tuple[list[int], dict[str, str]]:
    """Agents with at least two distinct values on the pool, and why the others are excluded."""
    excluded: dict[str, str] = {}
    usable: list[int] = []
    for j, name in enumerate(agents):
        values = columns[j][pool]
        if values.size == 0 or np.isnan(values).all():
            excluded[name] = "all null"
        elif np.nanmin(values) == np.nanmax(values):
            excluded[name] = "constant"
        else:
            usable.append(j)
    return usable, excluded


def _calibration_sample(
    columns: Sequence[np.ndarray],
    agents: list[str],
    usable: list[int],
    pool: np.ndarray,
    size: int,
    seed: int,
    excluded: dict[str, str],
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The calibration sample (rows x usable agents) drawn among the pool rows where every usable
    agent has a value. An agent constant on it cannot be standardised: it joins ``excluded`` and
    the sample is drawn again without it. Returns the usable agents, the sample and the rows it
    was drawn from."""
    sample = np.zeros((0, 0))
    complete_rows = np.zeros(0, dtype=np.int64)
    while usable:
        complete = np.ones(pool.size, dtype=bool)
        for j in usable:
            complete &= ~np.isnan(columns[j][pool])
        complete_rows = pool[complete]
        chosen = complete_rows
        if chosen.size > size:
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(chosen, size=size, replace=False))
        sample = np.column_stack([columns[j][chosen] for j in usable])
        if len(sample) < 2:
            break
        std = sample.std(axis=0, ddof=1)
        flat = [usable[k] for k in range(len(usable)) if not std[k] > 0]
        if not flat:
            break
        for j in flat:
            excluded[agents[j]] = "constant"
        usable = [j for j in usable if j not in flat]
    return usable, sample, complete_rows


def _shapley_weights(
    sample: np.ndarray,
    agents: list[str],
    usable: list[int],
    report: dict[str, Any],
    exact_max_agents: int,
    permutations: int,
    seed: int,
) -> np.ndarray:
    """Normalised Shapley weights of the usable agents on the calibration sample; records the
    Pearson matrix, exact or sampled, and (sampled) the standard errors in ``report``."""
    corr = np.atleast_2d(np.corrcoef(sample, rowvar=False)) if len(usable) > 1 else np.ones((1, 1))
    for a, ja in enumerate(usable):
        for b, jb in enumerate(usable):
            report["pearson"][ja][jb] = _json_float(float(corr[a, b]))
    stderr = None
    if len(usable) == 1:
        weights = np.ones(1)
    elif len(usable) <= exact_max_agents:
        weights = shapley_exact(corr)
    else:
        weights, stderr = shapley_sampled(corr, permutations=permutations, seed=seed)
        report["exact"] = False
        report["permutations"] = int(permutations)
    total = float(weights.sum())
    if not abs(total) > 1e-9:
        report["note"] = "the agents cancel out (v(all) = 0): equal weights"
        return np.full(len(usable), 1.0 / len(usable))
    if stderr is not None:
        report["stderr"] = {name: 0.0 for name in agents}
        for k, j in enumerate(usable):
            report["stderr"][agents[j]] = float(stderr[k] / abs(total))
    return weights / total


def _probe_reweight(
    probes: FamilyProbes,
    usable: list[int],
    agents: list[str],
    mean: np.ndarray,
    std: np.ndarray,
    weights: np.ndarray,
    report: dict[str, Any],
    seed: int,
) -> np.ndarray:
    """Weights of the usable agents under the probe value; records the probe report in ``report``."""
    from visa.probes.value import probe_weights

    z = np.column_stack(
        [probes.direction * (np.asarray(probes.columns[j], dtype=np.float64) - mean[k]) / std[k]
         for k, j in enumerate(usable)]
    )
    names = [agents[j] for j in usable]
    if probes.pairs.size == 0:
        report["warnings"] = [*report.get("warnings", []), "no probe pairs: consensus weights kept"]
        return weights
    found = probe_weights(z, probes.pairs, names, bootstrap=probes.bootstrap, seed=seed)
    report["value"] = "probes"
    report["probes"] = found
    report["warnings"] = list(found["warnings"])  # the consensus caveat no longer applies
    if len(usable) == 1:
        auroc = found["probe_auroc"][names[0]]
        silent = names[0] in found["no_information"]
        report["warnings"] = [f"{names[0]} orders its probes no better than chance (probe AUROC {auroc})"] if silent else []
        return weights
    return np.array([found["weights"][name] for name in names], dtype=np.float64)


def probe_target(family: str, unit: str) -> str:
    """Which probe ladders value a family: image ladders for image-level families, the garbled-answer
    ladders for ``pt``, and samples moved to other images for every other sample-level family."""
    from visa.families import PT
    from visa.probes.run import PLACEMENT, TEXT, VISUAL

    if unit == "image":
        return VISUAL
    return TEXT if family == PT else PLACEMENT


def family_probes(
    probes: pa.Table | None, family: str, unit: str, agents: list[str]
) -> tuple[FamilyProbes | None, str | None]:
    """The family's probe rows from a run's probe table, or (None, the reason there are none)."""
    from visa.probes.ladder import WEIGHT_CHAINS
    from visa.probes.value import FamilyProbes, ladder_pairs

    if probes is None:
        return None, "this run has no probes: consensus weights"
    target = probe_target(family, unit)
    rows = probes.filter(pc.equal(probes.column("target"), target))
    if target in WEIGHT_CHAINS:  # the source rows (empty chain) and the chains that value the agents
        chains = pa.array(["", *WEIGHT_CHAINS[target]])
        rows = rows.filter(pc.is_in(pc.fill_null(rows.column("chain"), ""), value_set=chains))
    if rows.num_rows == 0:
        return None, f"no '{target}' probes in this run: consensus weights"
    columns = [
        _as_float(rows.column(a)) if a in rows.column_names else np.full(rows.num_rows, np.nan) for a in agents
    ]
    pairs = ladder_pairs(
        rows.column("ladder").to_numpy(), rows.column("tier").to_numpy(), rows.column("chain").to_pylist()
    )
    direction = -1.0 if spec(family).direction < 0 else 1.0
    return FamilyProbes(columns, pairs, direction), None


def apply_fusion(table: pa.Table, report: Mapping[str, Any]) -> np.ndarray:
    """A family's fused score on any table with its agent columns (e.g. the probe rows), using the
    standardisation and weights of ``report`` (what :func:`fuse_family` returned for the pool)."""
    names = [n for n, w in report.get("weights", {}).items() if w and n in report.get("standardisation", {})]
    if not names:
        return np.full(table.num_rows, np.nan)
    columns = []
    for name in names:
        values = _as_float(table.column(name)) if name in table.column_names else np.full(table.num_rows, np.nan)
        scale = report["standardisation"][name]
        columns.append((values - scale["mean"]) / scale["std"])
    return renormalised_sum(columns, [report["weights"][n] for n in names])


def _value_weights(
    probes: FamilyProbes | None,
    usable: list[int],
    agents: list[str],
    mean: np.ndarray,
    std: np.ndarray,
    weights: np.ndarray,
    report: dict[str, Any],
    seed: int,
    calibrated: int,
) -> np.ndarray:
    """The family's final weights: consensus ones (flagged when they carry no information), or the
    probe value's when the family has probes."""
    report["value"] = "consensus"
    if len(usable) == 2 and calibrated >= 2:
        report["warnings"] = [
            "two agents: the consensus value gives 0.5 / 0.5 whatever their quality (no information)"
        ]
    if probes is None:
        return weights
    return _probe_reweight(probes, usable, agents, mean, std, weights, report, seed)


def _nanstd(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    std = float(present.std(ddof=1)) if present.size > 1 else 0.0
    return std if std > 0 else 1.0


def renormalised_sum(columns: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_j w_j x_j / sum_j w_j`` over the non-NaN ``x_j`` of each row; NaN where that sum is <= 0."""
    n = len(columns[0]) if columns else 0
    numerator = np.zeros(n)
    denominator = np.zeros(n)
    for column, weight in zip(columns, weights):
        if not weight:
            continue
        missing = np.isnan(column)
        if missing.any():
            numerator += np.where(missing, 0.0, column * weight)
            denominator += np.where(missing, 0.0, weight)
        else:
            numerator += column * weight
            denominator += weight
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numerator / denominator
    out[~(denominator > 1e-12)] = np.nan
    return out


def weighted_raw(table: pa.Table, report: Mapping[str, Any]) -> np.ndarray:
    """The family's Shapley-weighted mean of the **raw** (not standardised) agent values per row.

    Fused scores are sums of z-scores, so their zero is the calibration mean; a threshold with a
    meaning in the agents' own unit (IM <= 0: the image does not help) needs this instead. Nulls and
    renormalisation as in the fused score. Meaningful when the agents share a unit.
    """
    names = [name for name, weight in report["weights"].items() if weight and name in table.column_names]
    if not names:
        return np.full(table.num_rows, np.nan)
    return renormalised_sum(
        [_as_float(table.column(name)) for name in names], [report["weights"][name] for name in names]
    )


def _checked_unit(table: pa.Table, family: str, agents: list[str], units: Mapping[str, str]) -> str:
    """The family's unit, after checking that its agent columns exist and the unit is known."""
    missing = [a for a in agents if a not in table.column_names]
    if missing:
        raise FusionError(f"score family '{family}': no column {', '.join(missing)} in the table")
    unit = units.get(family, default_unit(family))
    if unit not in UNITS:
        raise FusionError(f"score family '{family}': unit must be 'image' or 'sample', not '{unit}'")
    return unit


def fuse_scores(
    table: pa.Table,
    families: Mapping[str, list[str]] | None = None,
    *,
    units: Mapping[str, str] | None = None,
    calibration_size: int = 1000,
    seed: int = 0,
    exact_max_agents: int = EXACT_MAX_AGENTS,
    permutations: int = DEFAULT_PERMUTATIONS,
    codes: np.ndarray | None = None,
    value: str = "consensus",
    probes: pa.Table | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Add one fused float64 column per score family (named after the family) to ``table``.

    ``families`` maps a family to its agent columns (default: :func:`score_families`). ``units``
    maps a family to ``"image"`` or ``"sample"`` (default: the family's unit in
    :mod:`visa.families`; ``sc``, ``oa``, ``dp`` are image-level, the rest sample-level). An existing column with
    a family's name is replaced. ``codes`` are the table's :func:`image_codes` when the caller already
    has them (they are computed here otherwise). ``value`` is ``"consensus"`` (the Pearson value
    above) or ``"probes"``: weights from the run's probe table ``probes`` (see
    :func:`family_probes`); a family without probe rows keeps consensus weights and says so in its
    report's ``warnings``. Returns the table and ``{family: report}`` (JSON-able; it goes into
    run.json under ``shapley``).
    """
    if value not in VALUES:
        raise FusionError(f"value must be one of {', '.join(VALUES)}, not '{value}'")
    if calibration_size < 2:
        raise FusionError("calibration_size must be at least 2")
    if families is None:
        families = score_families(table.schema)
    units = dict(units or {})
    eligible = _error_free(table)
    reports: dict[str, Any] = {}
    image_pool: np.ndarray | None = None
    sample_pool = np.flatnonzero(eligible)
    for family, agents in families.items():
        if not agents:
            continue
        unit = _checked_unit(table, family, agents, units)
        if unit == "image":
            if image_pool is None:
                image_pool = unique_image_rows(table, eligible, codes)
            pool = image_pool
        else:
            pool = sample_pool
        family_probe, missing_probes = (None, None) if value != "probes" else family_probes(
            probes, family, unit, list(agents))
        fused, report = fuse_family(
            [_as_float(table.column(a)) for a in agents],
            list(agents),
            pool,
            calibration_size=calibration_size,
            seed=seed,
            exact_max_agents=exact_max_agents,
            permutations=permutations,
            probes=family_probe,
        )
        if missing_probes:
            report["warnings"] = [*report.get("warnings", []), missing_probes]
        report = {"unit": unit, **report}
        column = pa.array(fused, type=pa.float64(), mask=np.isnan(fused))
        if family in table.column_names:
            table = table.set_column(table.column_names.index(family), family, column)
        else:
            table = table.append_column(family, column)
        reports[family] = report
    return table, reports
