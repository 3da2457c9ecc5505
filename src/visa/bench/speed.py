"""`visa bench speed`: throughput per agent and end to end, and peak memory, of one scoring run.

The run happens in a child process (so its peak resident memory is measured alone, with
``resource.getrusage(RUSAGE_CHILDREN)`` after it exits, which also covers the worker processes it
waited for). Per agent, the rate is items per second of the agent's own ``score_batch`` time from
run.json (``timings.agents``): images/s for image agents (one item per unique image), samples/s for
sample agents. End to end is records (and unique images) over the child's wall time, model loading
included.

With ``--ratios`` the naive-vs-optimised comparisons that already exist in ``benchmarks/`` and are
cheap enough to rerun (the PT+IM naive loop vs the batched embedded LM backend) are run as further
child processes on their default data and their JSON is attached; the others are referenced by
their BENCHMARKS.md section.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Existing naive-vs-optimised measurements: (name, script args, BENCHMARKS.md section, cheap to rerun)
RATIOS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    (
        "PT+IM: naive loop vs EmbeddedLMBackend",
        ("benchmarks/instruction_scores.py", "speed"),
        "Instruction scores (PT, IM) of the embedded recipe",
        True,
    ),
    (
        "Grounding DINO: naive vs cached features vs fast mode",
        ("benchmarks/grounding_dino_speed.py",),
        "Visual agents (paper)",
        False,
    ),
)

_CHILD = """
import json, sys
from pathlib import Path
from visa.recipe import load_recipe
from visa.scoring import score
recipe, data, run_dir, root, workers = sys.argv[1:6]
record = score(load_recipe(recipe), Path(data), Path(run_dir), image_root=Path(root) if root else None,
               workers=int(workers))
print(json.dumps({"run_dir": str(Path(run_dir))}))
"""


def repository_root() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "examples" / "llava.json").is_file() and (parent / "benchmarks").is_dir():
            return parent
    return None


def default_data() -> Path:
    root = repository_root()
    if root is None:
        raise FileNotFoundError("examples/llava.json not found: pass --data (or run from a source checkout)")
    return root / "examples" / "llava.json"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def agent_rates(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per agent column: unit, items, errors, seconds and items/s (from run.json)."""
    units = {
        a["column"]: a.get("unit")
        for a in run.get("agents") or []
        if isinstance(a, Mapping) and "column" in a
    }
    rows = []
    for column, t in (run.get("timings") or {}).get("agents", {}).items():
        seconds = float(t.get("seconds") or 0.0)
        items = int(t.get("items") or 0)
        unit = units.get(column, "?")
        rows.append(
            {
                "agent": column,
                "unit": unit,
                "items": items,
                "errors": int(t.get("errors") or 0),
                "seconds": round(seconds, 3),
                "per_second": round(items / seconds, 2) if seconds > 0 else None,
                "rate_unit": "images/s" if unit == "image" else "samples/s",
            }
        )
    return rows


def speed_report(run: Mapping[str, Any], wall_seconds: float, peak_rss_kib: int) -> dict[str, Any]:
    counts = run.get("counts") or {}
    timings = run.get("timings") or {}
    records = int(counts.get("records") or 0)
    images = int(counts.get("unique_images") or 0)
    return {
        "input": (run.get("input") or {}).get("path"),
        "recipe": (run.get("recipe") or {}).get("name"),
        "records": records,
        "unique_images": images,
        "agents": agent_rates(run),
        "end_to_end": {
            "wall_seconds": round(wall_seconds, 2),
            "scoring_seconds": timings.get("scoring_seconds"),
            "samples_per_second": round(records / wall_seconds, 3) if wall_seconds > 0 else None,
            "images_per_second": round(images / wall_seconds, 3) if wall_seconds > 0 else None,
        },
        "peak_rss_mib": round(peak_rss_kib / 1024.0, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }


def run_ratios(out_dir: Path, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run the cheap existing naive-vs-optimised benchmarks; reference the others."""
    root = repository_root()
    results = []
    for name, args, section, cheap in RATIOS:
        entry: dict[str, Any] = {"name": name, "section": f"BENCHMARKS.md: {section}"}
        if not cheap or root is None or not (root / args[0]).is_file():
            entry["status"] = "referenced (not rerun)"
            results.append(entry)
            continue
        target = out_dir / (Path(args[0]).stem + ".json")
        try:
            subprocess.run(
                [sys.executable, str(root / args[0]), *args[1:], "--out", str(target)],
                cwd=root,
                env={**_child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                check=True,
                timeout=timeout,
                capture_output=True,
                text=True,
            )
            entry["result"] = json.loads(target.read_text(encoding="utf-8"))
            entry["status"] = "measured"
        except (subprocess.SubprocessError, OSError, ValueError) as err:
            entry["status"] = f"failed: {str(err).splitlines()[0][:200]}"
        results.append(entry)
    return results


def run_speed(
    recipe: str,
    data: Path | None,
    out_dir: Path,
    *,
    image_root: Path | None = None,
    workers: int = 1,
    ratios: bool = False,
) -> dict[str, Any]:
    """Score ``data`` once in a child process into ``out_dir/run``; write speed.json and speed.md."""
    from visa.recipe import load_recipe

    load_recipe(recipe)  # a bad recipe is a clear error before the child starts
    data = Path(data) if data is not None else default_data()
    if not data.exists():
        raise FileNotFoundError(f"input not found: {data}")
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a resumed run would time nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, recipe, str(data), str(run_dir), str(image_root or ""), str(workers)],
        env=_child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if child.returncode != 0:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        from visa.bench.noise import BenchError

        raise BenchError(f"the scoring run failed (exit {child.returncode}): {tail}")
    from visa.run_folder import RunFolder

    run = RunFolder(run_dir).read_record().to_json()
    report = speed_report(run, wall, peak)
    report["peak_rss_note"] = (
        "max resident set of the scoring child (ru_maxrss of RUSAGE_CHILDREN; if an "
        "earlier child of this process was larger, that value)"
    )
    report["ratios"] = (
        run_ratios(out_dir)
        if ratios
        else [
            {"name": name, "section": f"BENCHMARKS.md: {section}", "status": "referenced (not rerun)"}
            for name, _, section, _ in RATIOS
        ]
    )
    (out_dir / "speed.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "speed.md").write_text(markdown_table(report), encoding="utf-8")
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    lines = ["| agent | unit | items | errors | seconds | rate |", "|---|---|---:|---:|---:|---:|"]
    for a in report["agents"]:
        rate = "n/a" if a["per_second"] is None else f"{a['per_second']:.2f} {a['rate_unit']}"
        lines.append(
            f"| {a['agent']} | {a['unit']} | {a['items']} | {a['errors']} | {a['seconds']:.2f} | {rate} |"
        )
    e = report["end_to_end"]
    lines.append(
        f"| **end to end** (wall, model loading included) | - | {report['records']} records, "
        f"{report['unique_images']} images | - | {e['wall_seconds']:.2f} | "
        f"{e['samples_per_second']} samples/s, {e['images_per_second']} images/s |"
    )
    lines.append("")
    lines.append(f"Peak RSS of the scoring process: {report['peak_rss_mib']} MiB.")
    for r in report.get("ratios", []):
        lines.append(
            f"- {r['name']}: {r['status']} ({r['section']})"
            + (f": {json.dumps(r['result'])}" if "result" in r else "")
        )
    return "\n".join(lines) + "\n"


def rich_table(report: Mapping[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title=f"speed: {report['records']} records, {report['unique_images']} images, "
        f"peak RSS {report['peak_rss_mib']} MiB"
    )
    for name in ("agent", "unit", "items", "errors", "seconds", "rate"):
        table.add_column(name, justify="left" if name in ("agent", "unit") else "right")
    for a in report["agents"]:
        rate = "n/a" if a["per_second"] is None else f"{a['per_second']:.2f} {a['rate_unit']}"
        table.add_row(
            a["agent"], str(a["unit"]), str(a["items"]), str(a["errors"]), f"{a['seconds']:.2f}", rate
        )
    e = report["end_to_end"]
    table.add_row(
        "end to end",
        "-",
        str(report["records"]),
        "-",
        f"{e['wall_seconds']:.2f}",
        f"{e['samples_per_second']} samples/s, {e['images_per_second']} images/s",
    )
    return table
