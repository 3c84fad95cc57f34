import json

import pytest
from typer.testing import CliRunner

from qconvert.cli import app

TEXT = "Quantization maps floating point weights to a few bits. " * 60

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep(tiny_lm, report, text, *extra):
    args = [
        "sweep",
        str(tiny_lm),
        "-o",
        str(report),
        "--bits",
        "8,4",
        "--group-size",
        "32",
        "--text",
        str(text),
        "--ctx",
        "64",
        "--max-tokens",
        "128",
        "--decode-tokens",
        "2",
        *extra,
    ]
    return CliRunner().invoke(app, args)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_sweep_writes_every_file_and_plots_every_point(tiny_lm, tmp_path, text):
    import matplotlib.image

    reference = tmp_path / "ref"
    assert CliRunner().invoke(app, ["model", str(tiny_lm), "-o", str(reference), "--bits", "6"]).exit_code == 0
    result = sweep(tiny_lm, tmp_path / "report", text, "--reference", str(reference))
    assert result.exit_code == 0, result.output
    report = tmp_path / "report"
    for name in ("report.md", "report.json", "report.csv", "tradeoff.png", "speed.png"):
        assert (report / name).is_file(), name
    rows = json.loads((report / "report.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["float", "qconvert", "qconvert", "reference"]
    assert all(r["status"] == "ok" and r["perplexity"] > 0 for r in rows)
    assert rows[1]["size_mb"] > rows[2]["size_mb"]  # 8 bits is bigger than 4
    for name in ("tradeoff.png", "speed.png"):
        assert (report / name).read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(report / name).shape
        assert height > 200 and width > 200
    from qconvert.evaluate.report import plotted
    from qconvert.evaluate.sweep import SweepRow

    assert len(plotted([SweepRow(**r) for r in rows])) == 4  # one point per row
    assert "| rtn int4 g32 |" in (report / "report.md").read_text()
    assert len((report / "report.csv").read_text().strip().splitlines()) == 5

    again = sweep(tiny_lm, tmp_path / "report", text)  # same settings: reuse, do not convert again
    assert again.exit_code == 0
    rows = json.loads((report / "report.json").read_text())["rows"]
    assert [r["reused"] for r in rows[1:]] == [True, True]


def test_a_failed_setting_is_reported_and_does_not_stop_the_others(tiny_lm, tmp_path, text):
    result = sweep(tiny_lm, tmp_path / "report", text, "--quantizer", "rtn,nope")
    assert result.exit_code == 5
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and "unknown quantizer" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in rows) == 3
    assert "Failures:" in (tmp_path / "report" / "report.md").read_text()


def test_sweep_adds_table_grids_at_their_own_bits(tiny_lm, tmp_path, text):
    result = sweep(tiny_lm, tmp_path / "report", text, "--bits", "4", "--grids", "nf4,mxfp4")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["float", "rtn int4 g32", "rtn nf4 g64", "rtn mxfp4 g32"]
    assert all(r["status"] == "ok" and r["perplexity"] > 0 for r in rows)
    assert rows[2]["quantized_bits_per_weight"] == 4.25  # a float16 scale per 64 codes


def test_sweep_adds_w8a8_schemes(tiny_lm, tmp_path, text):
    extra = ["--bits", "8", "--activations", "int8-dynamic,int8-static", "--smooth", "0.5"]
    extra += ["--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "32"]
    result = sweep(tiny_lm, tmp_path / "report", text, *extra)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    labels = [r["label"] for r in rows]
    assert labels[-2:] == ["rtn w8a8 int8-dynamic smooth 0.5", "rtn w8a8 int8-static smooth 0.5"]
    assert all(r["status"] == "ok" for r in rows), rows


def test_sweep_w8a8_with_smoothing_needs_calibration(tiny_lm, tmp_path, text):
    result = sweep(tiny_lm, tmp_path / "report", text, "--activations", "int8-dynamic", "--smooth", "auto")
    assert result.exit_code != 0 and "give the sweep --calib FILE" in result.output, result.output
