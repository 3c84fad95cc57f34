"""Batch jobs and one model's shards on a real local Ray cluster: a head and two worker nodes, each a
separate raylet process on this machine with its own CPUs and memory."""

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from qconvert.batch import load_jobs, run_batch  # noqa: E402
from qconvert.cluster import connect, job_memory, run_batch_on_cluster  # noqa: E402

NODE_MEMORY = 1_400_000_000  # each worker node: room for two tiny jobs at a time, not three
OBJECT_STORE = 80 * 2**20  # Ray's shared-memory store: jobs pass only small results through it


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE}
    )  # the head runs no jobs
    nodes = [cluster.add_node(num_cpus=3, memory=NODE_MEMORY, object_store_memory=OBJECT_STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    connect(cluster.address)
    yield cluster, [n.node_id for n in nodes]
    ray.shutdown()
    cluster.shutdown()


def write_batch(tmp_path: Path, tiny_llama: Path) -> Path:
    jobs = [
        f'[[jobs]]\nsource = "{tiny_llama}"\nsettings = {{ bits = {b}, group_size = {g} }}\n'
        for b, g in ((2, 32), (3, 32), (4, 32), (8, 32), (4, 16))
    ]
    jobs.append(f'[[jobs]]\nsource = "{tmp_path / "missing"}"\nsettings = {{ bits = 4 }}\n')  # fails: no such model
    path = tmp_path / "jobs.toml"
    path.write_text('[defaults]\noutput_dir = "out"\n' + "".join(jobs))
    return path


def test_a_batch_runs_on_the_cluster_as_it_runs_here(tmp_path, tiny_llama, cluster, monkeypatch):
    _, node_ids = cluster
    path = write_batch(tmp_path, tiny_llama)
    jobs = load_jobs(path)
    # Each job asks for its predicted memory; pretend it is 600 MB so that only two fit on a node at once.
    monkeypatch.setattr("qconvert.cluster.job_memory", lambda job: 600_000_000)
    results = run_batch_on_cluster(jobs, tmp_path / "report.json", "auto", keep_going=True)
    assert [r.status for r in results] == ["converted"] * 5 + ["failed"]
    assert "does not exist" in results[5].error or "missing" in results[5].error  # isolated: the others converted
    report = json.loads((tmp_path / "report.json").read_text())
    assert [j["status"] for j in report["jobs"]] == [r.status for r in results]
    placements = [r.placement for r in results]
    assert {p["node"] for p in placements} <= set(node_ids)  # never on the head
    for node in node_ids:  # never more jobs at once on a node than its memory holds (two)
        spans = [(p["began"], p["ended"]) for p in placements if p["node"] == node]
        for began, _ in spans:
            assert sum(1 for b, e in spans if b <= began < e) <= 2

    # Run again: the converted jobs are current and skipped, as in a local batch.
    again = run_batch_on_cluster(jobs, tmp_path / "report.json", "auto", keep_going=True)
    assert [r.status for r in again] == ["skipped"] * 5 + ["failed"]
    local = run_batch(jobs, tmp_path / "local-report.json", keep_going=True)
    assert [r.status for r in local] == ["skipped"] * 5 + ["failed"]


def test_predicted_memory_is_what_a_job_asks_for(tmp_path, tiny_llama):
    jobs = load_jobs(write_batch(tmp_path, tiny_llama))
    assert 0.2e9 < job_memory(jobs[0]) < 2e9


def test_one_model_converted_across_the_workers_is_byte_identical_to_a_local_conversion(tmp_path, tiny_llama, cluster):
    from qconvert.cluster import convert_across_cluster
    from qconvert.conversion import convert
    from qconvert.settings import Settings

    settings = Settings(bits=4, group_size=32, max_shard_size=30_000)
    local = convert(tiny_llama, tmp_path / "local", settings).output
    spread = convert_across_cluster(tiny_llama, tmp_path / "cluster", settings, "auto").output
    files = sorted(p.name for p in local.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) >= 3  # several parts, one task each
    assert sorted(p.name for p in spread.iterdir()) == files
    for name in files:
        assert (local / name).read_bytes() == (spread / name).read_bytes(), name


def test_calibrated_conversions_are_not_split(tmp_path, tiny_llama, cluster):
    from qconvert.calibration.samples import CalibrationSettings
    from qconvert.cluster import convert_across_cluster
    from qconvert.errors import SchemeError
    from qconvert.settings import Settings

    text = tmp_path / "calib.txt"
    text.write_text("words " * 2000)
    settings = Settings(quantizer="gptq", calibration=CalibrationSettings(text=str(text)), max_shard_size=30_000)
    with pytest.raises(SchemeError, match="cannot be split"):
        convert_across_cluster(tiny_llama, tmp_path / "out", settings, "auto")
    assert not (tmp_path / "out").exists()


def test_a_sweep_runs_its_settings_on_the_cluster(tmp_path, tiny_lm, cluster):
    from typer.testing import CliRunner

    from qconvert.cli import app

    text = tmp_path / "text.txt"
    text.write_text("Quantization maps floating point weights to a few bits. " * 60)
    args = ["sweep", str(tiny_lm), "-o", str(tmp_path / "report"), "--bits", "8,4", "--group-size", "32"]
    args += ["--text", str(text), "--ctx", "64", "--max-tokens", "128", "--decode-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--cluster", "auto", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    converted = [r for r in rows if r["role"] == "qconvert"]
    assert len(converted) == 2 and all(r["status"] == "ok" and r["perplexity"] for r in converted)
