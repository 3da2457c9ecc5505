"""What running on Ray costs against the local executor, on the same data, side by side in one run.

The bundled examples (73 records, 19 unique images) are replicated to ``--records`` records, each
copy with its own id (so per-sample agents score every copy, while image agents still score each of
the 19 images once, as with LLaVA-style data that reuses images). Two recipes are run on both
executors:

* ``embedded``: the default recipe as it is (real packaged models);
* ``stats``: one trivial image agent, so the difference between the executors is the framework's
  own cost (Ray Data start, actor start, moving shards through the object store); run at
  ``--records`` and at ten times that: the difference grows little with the shards (streaming
  hides most of the per-shard cost), so it is mostly a fixed start-up cost.

Ray runs on a local instance started here (``--cpus``), timed apart. Actor pools get
``min(1, (cpus - 2 * task_cpus) / pools)`` CPUs each so that the prepare/commit tasks always keep
CPU. Both score tables are compared: identical rows, or the largest difference of a float value
(local torch/ONNX kernels use several threads, the fractional-CPU actors one, which changes the
order of float sums).

    PYTHONPATH=src .venv/bin/python benchmarks/ray_overhead.py --records 146 --shard-size 32
    PYTHONPATH=src .venv/bin/python benchmarks/ray_overhead.py --records 146 --shard-size 32 \
        --recipes embedded --ray-first --local-threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from visa.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def replicate(records: list[dict], n: int, path: Path) -> Path:
    out = []
    for i in range(n):
        record = dict(records[i % len(records)])
        record["id"] = f"{record['id']}~{i // len(records)}"
        out.append(record)
    path.write_text(json.dumps(out))
    return path


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run the local executor's models with ``count`` threads (torch, and ONNX Runtime via OMP_NUM_THREADS)."""
    if count is None:
        yield
        return
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def compare(a: Path, b: Path) -> dict:
    left, right = pq.read_table(a).to_pylist(), pq.read_table(b).to_pylist()
    if left == right:
        return {"identical": True, "max_abs_diff": 0.0, "differing_values": 0}
    worst, differing = 0.0, 0
    for x, y in zip(left, right, strict=True):
        for key in x.keys() | y.keys():
            u, v = x.get(key), y.get(key)
            if u == v:
                continue
            differing += 1
            pairs = zip(u, v, strict=False) if isinstance(u, list) and isinstance(v, list) else [(u, v)]
            for p, q in pairs:
                if isinstance(p, float) and isinstance(q, float):
                    worst = max(worst, abs(p - q))
                elif p != q:
                    worst = math.inf
    return {"identical": False, "max_abs_diff": worst, "differing_values": differing}


def measure(args: argparse.Namespace, recipe: Any, data: Path, out: Path) -> dict:
    """Score ``data`` with the local executor and with Ray (in the order asked), and compare."""
    from visa.executors.ray import RayExecutor
    from visa.scoring import score

    pools = RayExecutor().placements(recipe)
    per_actor = min(1.0, (args.cpus - 2 * args.task_cpus) / len(pools))
    executor = RayExecutor(pools={"*": {"size": 1, "cpus": per_actor}}, task_cpus=args.task_cpus)
    timed: dict[str, tuple[dict, float, list[float]]] = {}
    for which in (["ray", "local"] if args.ray_first else ["local", "ray"]):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        if which == "local":
            with threads(args.local_threads):
                record = score(recipe, data, out / "local", image_root=EXAMPLES)
        else:
            record = score(recipe, data, out / "ray", image_root=EXAMPLES, executor=executor)
        timed[which] = (record, time.perf_counter() - started, [round(load, 1), round(os.getloadavg()[0], 1)])
    (local, local_wall, local_load), (remote, ray_wall, ray_load) = timed["local"], timed["ray"]
    return {
        "pools": [p.describe() for p in executor.placements(recipe)],
        "shards": remote["shards"]["total"],
        "order": "ray, local" if args.ray_first else "local, ray",
        "local_threads": args.local_threads or "default",
        "load_average_1min_start_end": {"local": local_load, "ray": ray_load},
        "local_seconds": round(local_wall, 2),
        "ray_seconds": round(ray_wall, 2),
        "ray_minus_local_seconds": round(ray_wall - local_wall, 2),
        "ray_over_local": round(ray_wall / local_wall, 3),
        "local_agent_seconds": {k: v["seconds"] for k, v in local["timings"]["agents"].items()},
        "ray_agent_seconds": {k: v["seconds"] for k, v in remote["timings"]["agents"].items()},
        "tables": compare(RunFolder(out / "local").scores, RunFolder(out / "ray").scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=146)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray instance")
    parser.add_argument("--task-cpus", type=float, default=0.25)
    parser.add_argument("--recipes", nargs="+", default=["embedded", "stats"], choices=["embedded", "stats"])
    parser.add_argument("--ray-first", action="store_true", help="run Ray before local (order effects)")
    parser.add_argument("--local-threads", type=int, default=None,
                        help="torch/ONNX threads of the local run (default: the libraries' own, all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    import ray

    from visa.recipe import ExecutionSpec, load_recipe

    work = Path(tempfile.mkdtemp(prefix="visa-ray-overhead-"))
    records = json.loads((EXAMPLES / "llava.json").read_text())
    sizes = {"embedded": [args.records], "stats": [args.records, 10 * args.records]}
    stats_yaml = work / "stats.yaml"
    stats_yaml.write_text("name: stats\nscores:\n  image:\n    agents: [{name: stats, type: image_stats}]\n")

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started

    results: dict = {
        "records": args.records, "shard_size": args.shard_size, "cpus": args.cpus,
        "ray_init_seconds": round(ray_start, 2), "load_average_before": os.getloadavg(), "runs": {},
    }
    for name, n in [(recipe_name, n) for recipe_name in args.recipes for n in sizes[recipe_name]]:
        label = f"{name}@{n}"
        recipe = load_recipe("embedded" if name == "embedded" else stats_yaml)
        recipe = recipe.model_copy(update={"execution": ExecutionSpec(shard_size=args.shard_size)})
        run = measure(args, recipe, replicate(records, n, work / f"data-{n}.json"), work / label)
        run = {"recipe": name, "records": n, **run}
        results["runs"][label] = run
        print(f"{label}: {run['shards']} shards, pools {run['pools']}", file=sys.stderr)
        print(f"  local {run['local_seconds']:.1f} s, ray {run['ray_seconds']:.1f} s (+ init {ray_start:.1f} s), "
              f"tables {run['tables']}", file=sys.stderr)
    for run in results["runs"].values():  # everything Ray adds, fixed start included, spread over the shards
        run["ray_extra_seconds_per_shard"] = round(run["ray_minus_local_seconds"] / run["shards"], 3)
    results["load_average_after"] = os.getloadavg()
    ray.shutdown()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
