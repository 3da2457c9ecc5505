"""Content clusters at LLaVA-OneVision scale: CPU time and peak memory of ``visa.clusters``.

Two measurements, each in a fresh subprocess (peak RSS from ``getrusage``):

``stream`` (default 3,000,000 rows)
    The scoring-time step as it runs over a table's chunks: the fit sample (``fit_rows``) is drawn,
    reduced by PCA and clustered (k chosen by silhouette), then every chunk of ``chunk_rows`` rows is
    turned from two Arrow ``list<float32>`` columns of 384 dimensions (the MiniLM image-evidence and
    conversation embeddings) into the normalised matrix and assigned to its nearest centre. The
    chunks are generated on the fly, so the 9 GB of embeddings a 3M-row table holds are never in
    memory at once; generating them is timed separately and subtracted.
``table`` (default 300,000 rows)
    :func:`visa.clusters.add_clusters` on a whole in-memory table of that size (its two embedding
    columns alone take 0.9 GB), i.e. exactly what ``visa score`` calls.

The synthetic embeddings are 40 topics (Gaussian centres) with noise; the adjusted Rand index
between the clusters and the topics is reported as a sanity check, not as a quality claim.

    PYTHONPATH=src .venv/bin/python benchmarks/cluster_scale.py
    PYTHONPATH=src .venv/bin/python benchmarks/cluster_scale.py --stream-rows 3000000 --table-rows 300000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DIM = 384
TOPICS = 40


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Synthetic:
    """Image-evidence and conversation embeddings of rows drawn from ``TOPICS`` topics."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.image_centres = rng.normal(size=(TOPICS, DIM)).astype(np.float32)
        self.text_centres = rng.normal(size=(TOPICS, DIM)).astype(np.float32)
        self.share = rng.dirichlet(np.ones(TOPICS) * 2)
        self.seed = seed

    def chunk(self, start: int, rows: int) -> tuple[pa.Table, np.ndarray]:
        rng = np.random.default_rng((self.seed, start + 1))
        topic = rng.choice(TOPICS, size=rows, p=self.share)
        columns = {}
        for name, centres in (("image", self.image_centres), ("text", self.text_centres)):
            values = centres[topic] + rng.normal(scale=1.2, size=(rows, DIM)).astype(np.float32)
            flat = pa.array(values.reshape(-1), pa.float32())
            offsets = pa.array(np.arange(0, rows * DIM + 1, DIM, dtype=np.int32))
            columns[name] = pa.ListArray.from_arrays(offsets, flat)
        return pa.table(columns), topic


def stream(rows: int, fit_rows: int, chunk_rows: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from visa.clusters import ClusterSpec, embedding_matrix, fit_clusterer

    spec = ClusterSpec(embeddings=["image", "text"], fit_rows=fit_rows, chunk_rows=chunk_rows)
    data = Synthetic()
    generate = 0.0
    t = _cpu()
    sample_table, _ = data.chunk(-1, min(fit_rows, rows))  # its own stream: not a chunk of the table
    generate += _cpu() - t
    started_wall, started = time.perf_counter(), _cpu()
    sample, _ = embedding_matrix(sample_table, spec, [DIM, DIM])
    clusterer = fit_clusterer(sample, spec)
    del sample, sample_table
    fit_cpu = _cpu() - started
    ids = np.empty(rows, dtype=np.int32)
    distance = np.empty(rows, dtype=np.float64)
    truth = np.empty(rows, dtype=np.int32)
    for start in range(0, rows, chunk_rows):
        t = _cpu()
        table, topic = data.chunk(start, min(chunk_rows, rows - start))
        generate += _cpu() - t
        block, _ = embedding_matrix(table, spec, [DIM, DIM])
        end = start + len(block)
        ids[start:end], distance[start:end] = clusterer.assign(block)
        truth[start:end] = topic
    total_cpu = _cpu() - started - (generate - 0.0)
    wall = time.perf_counter() - started_wall
    check = np.random.default_rng(1).choice(rows, size=min(rows, 200_000), replace=False)
    return {
        "mode": "stream", "rows": rows, "fit_rows": fit_rows, "chunk_rows": chunk_rows,
        "k": clusterer.k, "silhouette": clusterer.report["silhouette"],
        "fit_cpu_s": round(fit_cpu, 1), "assign_cpu_s": round(total_cpu - fit_cpu, 1),
        "cpu_s_without_generation": round(total_cpu, 1), "generation_cpu_s": round(generate, 1),
        "wall_s_with_generation": round(wall, 1),
        "ari_vs_topics": round(float(adjusted_rand_score(truth[check], ids[check])), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def table(rows: int) -> dict:
    from visa.clusters import ClusterSpec, add_clusters

    data = Synthetic()
    parts = [data.chunk(start, min(65_536, rows - start)) for start in range(0, rows, 65_536)]
    whole = pa.concat_tables([p for p, _ in parts])
    whole = whole.append_column("row", pa.array(np.arange(rows), pa.int64()))
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec = ClusterSpec(embeddings=["image", "text"])
    started_wall, started = time.perf_counter(), _cpu()
    out, summary = add_clusters(whole, spec)
    return {
        "mode": "table", "rows": rows, "k": summary["k"], "cpu_s": round(_cpu() - started, 1),
        "wall_s": round(time.perf_counter() - started_wall, 1),
        "rss_after_building_table_mib": round(built_rss),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream-rows", type=int, default=3_000_000)
    parser.add_argument("--table-rows", type=int, default=300_000)
    parser.add_argument("--fit-rows", type=int, default=50_000)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--child", choices=("stream", "table"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "stream":
        print(json.dumps(stream(args.stream_rows, args.fit_rows, args.chunk_rows)))
        return 0
    if args.child == "table":
        print(json.dumps(table(args.table_rows)))
        return 0
    for child, rows in (("stream", args.stream_rows), ("table", args.table_rows)):
        if rows <= 0:
            continue
        command = [sys.executable, __file__, "--child", child, "--stream-rows", str(args.stream_rows),
                   "--table-rows", str(args.table_rows), "--fit-rows", str(args.fit_rows),
                   "--chunk-rows", str(args.chunk_rows)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
