"""8 conversion jobs on one node against the same jobs on a Ray cluster: wall seconds, and what Ray
adds to each job (the task's time on its node minus the job's own seconds, and the wait from submission).

The cluster is real but local: a head (no CPUs for jobs) and `--nodes` worker nodes, each a separate
raylet process with `--cpus` CPUs and `--memory` bytes (`ray.cluster_utils.Cluster`), started and torn
down here. On one machine the nodes share its cores, so the speed-up says how well jobs are packed,
not what more machines would add.

Usage:
    python scripts/bench_cluster.py [models/smollm2-135m] [--nodes 2] [--cpus 1] [--memory 3e9]
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qconvert.batch import load_jobs, run_batch

OBJECT_STORE = 80 * 2**20  # Ray's shared-memory store: jobs pass only small results through it
SETTINGS = [(8, 0), (6, 64), (5, 64), (4, 32), (4, 64), (4, 128), (3, 64), (2, 64)]  # (bits, group size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, default=Path("models/smollm2-135m"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", type=float, default=3e9)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="qconvert-bench-cluster-"))
    try:
        jobs_file = scratch / "jobs.toml"
        jobs_file.write_text(
            "".join(
                f'[[jobs]]\nsource = "{args.source.resolve()}"\noutput = "one/{b}-{g}"\n'
                f"settings = {{ bits = {b}, group_size = {g} }}\n"
                for b, g in SETTINGS
            )
        )
        jobs = load_jobs(jobs_file)
        began = time.perf_counter()
        local = run_batch(jobs, scratch / "one-report.json")
        one_node = time.perf_counter() - began
        print(f"one node, one job at a time: {one_node:.1f} s for {len(jobs)} jobs")

        import ray
        from ray.cluster_utils import Cluster

        from qconvert.cluster import connect, run_batch_on_cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.cpus, memory=int(args.memory), object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        connect(cluster.address)
        try:
            for job in jobs:
                job.output = scratch / "cluster" / job.output.name
            submitted = time.time()
            began = time.perf_counter()
            results = run_batch_on_cluster(jobs, scratch / "cluster-report.json", "auto")
            spread = time.perf_counter() - began
        finally:
            ray.shutdown()
            cluster.shutdown()
        overhead = [(r.placement["ended"] - r.placement["began"]) - r.seconds for r in results]
        first_start = min(r.placement["began"] for r in results) - submitted
        converted = sum(r.status == "converted" for r in results)
        print(
            f"cluster of {args.nodes} nodes x {args.cpus} CPU: {spread:.1f} s for {len(jobs)} jobs "
            f"({one_node / spread:.2f}x); {converted} of {len(jobs)} converted"
        )
        print(
            f"Ray's part of each job: median {statistics.median(overhead) * 1000:.0f} ms, "
            f"max {max(overhead) * 1000:.0f} ms on top of the job's own seconds; first task started "
            f"{first_start:.2f} s after submission (prediction of memory included)"
        )
        jobs_seconds = [r.seconds for r in local]
        print(f"a job's own seconds (one node): median {statistics.median(jobs_seconds):.2f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
