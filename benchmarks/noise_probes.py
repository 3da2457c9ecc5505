"""Before/after table of the probe-calibrated selection on scored ``visa bench noise`` runs.

Re-selects (model-free) each scored noise run under a few settings and rates, per setting and
budget: the fused ``im`` and the best single IM agent (AUROC over all noise), the stage-1 visual
score and the best single visual agent (AUROC per degradation kind), and the noise rate of the
selection against ranking by the best single column (the column with the highest precision at
that budget; that choice uses the labels, so it is an oracle the selection has to match).

    PYTHONPATH=src .venv/bin/python benchmarks/noise_probes.py runs/after-s0 runs/after-s1 \\
        --budgets 25%,50% --out runs/noise-probes.json

Settings (``--settings``; default all):

* ``before``: the previous defaults, reproduced with today's options: consensus value, equal
  stage-1 weights of sc/oa/dp, ``image_keep`` 0.5, ``im_min`` 0 on raw IM, no image gate and no
  typicality cut, and without the agents added since (``sc.jpeg_bits``, ``oa.label_entropy``,
  ``sc.pixel_correlation``, ``sc.block_grid``, ``sc.detail_scale``);
* ``probes-old-agents``: the probe defaults without those agents (and without the gate, which
  reads two of them);
* ``probes``: the run's own defaults (its recipe's ``selection:`` section) with every agent;
* ``probes-no-dp``: the same without the ``dp.judge`` column (runs scored while the embedded recipe
  still had the text judge: what leaving it out changes);
* ``no-dp-no-clusters``: ``probes-no-dp`` with ``clusters: off`` (what the content clusters change).

Each row also counts the noisy samples the selection kept, per kind (``noise_selected``).

Every setting starts from the recipe's ``selection:`` section (as ``visa select`` does) and
overrides what it names.

A setting runs in a copy of the run folder (run.json's agent list trimmed when agents are left out;
scores.parquet and the probes linked), so the scored run is never changed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from visa.bench.noise import DEGRADATIONS, auroc, budget_count, pool_kinds, precision_at, rated, read_records
from visa.run_folder import RunFolder
from visa.selection import select
from visa.selection.options import resolve_options

NEW_AGENTS = ("sc.jpeg_bits", "oa.label_entropy", "sc.pixel_correlation", "sc.block_grid", "sc.detail_scale")
NO_GATE: dict[str, Any] = {"image_gate": {}, "cluster_atypical": 0.0}
SETTINGS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "before": ({"value": "consensus", "image_keep": 0.5, "im_min": 0.0, **NO_GATE}, NEW_AGENTS),
    "probes-old-agents": ({"image_gate": {}}, NEW_AGENTS),
    "probes": ({}, ()),
    "probes-no-dp": ({}, ("dp.judge",)),
    "no-dp-no-clusters": ({"clusters": "off"}, ("dp.judge",)),
}
VISUAL = ("sc", "oa", "dp")


def _run_json(run_dir: Path) -> dict[str, Any]:
    return json.loads(RunFolder(run_dir).run_json.read_text(encoding="utf-8"))


def _copy_run(run_dir: Path, drop: tuple[str, ...], into: Path) -> Path:
    into.mkdir(parents=True)
    source, copy = RunFolder(run_dir), RunFolder(into)
    run = _run_json(run_dir)
    run["agents"] = [a for a in run.get("agents", []) if a.get("column") not in drop]
    copy.run_json.write_text(json.dumps(run))
    copy.scores.symlink_to(source.scores.resolve())
    if source.probes.path.is_dir():
        copy.probes.path.symlink_to(source.probes.path.resolve())
    return into


def _fused_columns(result: Any, run_dir: Path) -> dict[str, np.ndarray]:
    """The select-time fused family values per row, rebuilt from the shapley report of the selection."""
    from visa.fusion import apply_fusion

    table = pq.read_table(RunFolder(run_dir).scores)
    return {family: apply_fusion(table, report) for family, report in result.shapley.items()}


def _pooled_visual(table: Any, fused: dict[str, np.ndarray], weights: dict[str, float] | None) -> np.ndarray:
    """Stage 1's visual score without content clusters: the weighted mean of the fused visual
    families' percentile ranks over the unique images (per row, NaN without an image)."""
    from visa.fusion import image_codes, renormalised_sum, unique_image_rows
    from visa.selection.ranks import percentile_ranks

    codes = image_codes(table)
    rows = unique_image_rows(table, np.ones(table.num_rows, dtype=bool), codes)
    families = [f for f in (weights or {}) if f in fused and (weights or {})[f] > 0]
    per_image = renormalised_sum([percentile_ranks(fused[f][rows]) for f in families], [weights[f] for f in families])
    by_code = np.full(int(codes.max()) + 1 if codes.size else 0, np.nan)
    by_code[codes[rows]] = per_image
    return np.where(codes >= 0, by_code[np.maximum(codes, 0)], np.nan)


def _rate(values: np.ndarray, kinds: np.ndarray, noisy: str | None = None) -> float:
    clean = kinds == "clean"
    other = ~clean if noisy is None else kinds == noisy
    return auroc(values[clean], values[other])


def evaluate(run_dir: Path, pool: list[dict], setting: str, budget: str, seed: int) -> dict[str, Any]:
    options, drop = SETTINGS[setting]
    run = _run_json(run_dir)
    table = pq.read_table(RunFolder(run_dir).scores)
    kinds = pool_kinds(table, pool)
    with tempfile.TemporaryDirectory() as tmp:
        copy = _copy_run(run_dir, drop, Path(tmp) / "run")
        chosen = resolve_options(run, {"budget": budget, "seed": seed, **options})
        result = select(copy, chosen, write_records=False, update_run=False)
        fused = _fused_columns(result, copy)
    k = budget_count(budget, table.num_rows)
    selected = np.asarray(result.table.column("selected").to_pylist(), dtype=bool)
    visual = rated(result.table.column("visual_score").to_pylist())
    agents = [a["column"] for a in run.get("agents", []) if a.get("column") not in drop]
    columns = {c: rated(table.column(c).to_pylist(), flip=c.startswith("pt.")) for c in agents if c.split(".")[0] not in ("image",)}
    im_agents = {c: v for c, v in columns.items() if c.startswith("im.")}
    visual_agents = {c: v for c, v in columns.items() if c.split(".")[0] in VISUAL}
    best_im = max(im_agents, key=lambda c: _rate(im_agents[c], kinds)) if im_agents else None
    singles = {**columns, **{f: rated(v, flip=f == "pt") for f, v in fused.items()}}
    best_column = max(singles, key=lambda c: precision_at(singles[c], kinds == "clean", k))
    degradations = [d for d in DEGRADATIONS if (kinds == d).any()]
    out: dict[str, Any] = {
        "setting": setting,
        "budget": budget,
        "selected": int(selected.sum()),
        "noise_rate": round(1 - float((kinds[selected] == "clean").mean()), 4) if selected.any() else None,
        "noise_selected": {str(k): int(n) for k, n in zip(*np.unique(kinds[selected & (kinds != "clean")], return_counts=True))},
        "best_column": best_column,
        "best_column_noise_rate": round(1 - precision_at(singles[best_column], kinds == "clean", k), 4),
        "im": round(_rate(rated(fused["im"]), kinds), 4) if "im" in fused else None,
        "best_im_agent": best_im,
        "best_im_agent_auroc": round(_rate(im_agents[best_im], kinds), 4) if best_im else None,
        "visual": {d: round(_rate(visual, kinds, d), 4) for d in degradations},
        "best_visual_agent": {
            d: max(((c, round(_rate(v, kinds, d), 4)) for c, v in visual_agents.items()), key=lambda cv: cv[1])
            for d in degradations
        },
        "visual_weights": result.summary.get("visual_weights"),
        "weights": {f: r.get("weights") for f, r in result.shapley.items()},
        "images_kept": result.summary.get("images"),
        "dropped": {k: v for k, v in result.summary.get("dropped", {}).items() if v},
    }
    visual_all = np.isin(kinds, degradations)
    clean = kinds == "clean"
    out["visual"]["all degraded"] = round(auroc(visual[clean], visual[visual_all]), 4)
    # the fused visual score itself (clusters rank images within their cluster, on purpose)
    pooled = rated(_pooled_visual(table, fused, result.summary.get("visual_weights")))
    out["visual_pooled"] = {d: round(_rate(pooled, kinds, d), 4) for d in degradations}
    out["visual_pooled"]["all degraded"] = round(auroc(pooled[clean], pooled[visual_all]), 4)
    out["best_visual_agent"]["all degraded"] = max(
        ((c, round(auroc(v[clean], v[visual_all]), 4)) for c, v in visual_agents.items()), key=lambda cv: cv[1]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `visa bench noise`")
    parser.add_argument("--budgets", default="25%,50%")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="selection seed when a run has no noise.json")
    args = parser.parse_args()
    rows = []
    for bench in args.runs:
        report_path = bench / "noise.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {"seed": args.seed}
        pool = read_records(bench / "pool" / "pool.json")
        for setting in args.settings.split(","):
            for budget in args.budgets.split(","):
                row = evaluate(bench / "run", pool, setting, budget, int(report.get("seed", 0)))
                row["run"] = str(bench)
                rows.append(row)
                print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
