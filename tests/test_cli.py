"""`ctvl analyze | locate | info`: outputs on disk, result.json schema, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ctvl.cli import main
from ctvl.geometry import Volume
from ctvl.io import read_volume, write_volume
from ctvl.prompts import LABELS, label_slug

from tests.inference_stub import ORIENTATIONS, make_volume, voxel_ras

LESION = np.array([15.0, -10.0, 35.0])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from ctvl.model import CTVLModel, save_weights, tiny_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weights") / "tiny"
    save_weights(CTVLModel(tiny_config()).eval(), out)
    return out


def chest_like(direction=ORIENTATIONS["lps"], shape_kji=(30, 48, 44), spacing=(4.0, 4.5, 5.0)) -> Volume:
    """Air around a soft-tissue ellipse with two lungs and a bright lesion: passes CT validation."""
    vol = make_volume(direction, shape_kji=shape_kji, spacing_ijk=spacing)
    ras = voxel_ras(vol)
    x, y = ras[..., 0] - 10.0, ras[..., 1] + 20.0
    hu = np.full(vol.array.shape, -1000.0, np.float32)
    hu[(x / 90) ** 2 + (y / 70) ** 2 <= 1] = 40.0
    hu[((np.abs(x) - 40) / 30) ** 2 + (y / 45) ** 2 <= 1] = -850.0
    hu[np.linalg.norm(ras - LESION, axis=-1) <= 9.0] = 60.0
    return vol.with_array(hu.astype(np.int16))


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "chest.nii.gz"
    write_volume(chest_like(), path)
    return path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_result_heatmaps_and_overview(tmp_path, weights, ct_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["analyze", ct_path, "--model", weights, "--query", "nodule in the left lung",
                                 "--query", "pleural effusion", "--out", out, "--heatmap-grid", "input",
                                 "--labels", "Lung nodule", "Emphysema", "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert set(result) >= {"volume", "model", "diseases", "queries", "timing_s"}
    assert result["model"] == {"name": "tiny-hybrid", "version": "0.1.0"}
    assert [d["name"] for d in result["diseases"]] == ["Lung nodule", "Emphysema"]
    vol = read_volume(ct_path)
    for d in result["diseases"]:
        assert 0.0 <= d["probability"] <= 1.0
        assert d["heatmap"] == f"heatmaps/{label_slug(d['name'])}.nii.gz"
        heat = read_volume(out / d["heatmap"], validate=False)
        assert heat.array.shape == vol.array.shape and heat.array.dtype == np.float32
        np.testing.assert_allclose(heat.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert [q["text"] for q in result["queries"]] == ["nodule in the left lung", "pleural effusion"]
    positions = vol.slice_positions_mm()
    for q in result["queries"]:
        assert 1 <= len(q["slices"]) <= 5
        for s in q["slices"]:
            assert set(s) == {"slice", "position_mm", "score"}
            assert 0 <= s["slice"] < vol.n_slices
            assert s["position_mm"] == pytest.approx(positions[s["slice"]], abs=1e-3)
    assert {"load", "encode", "heatmaps"} <= set(result["timing_s"])
    png = (out / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "result.json" in stdout


def test_analyze_default_all_labels_model_grid(tmp_path, weights, ct_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(["analyze", ct_path, "--model", weights, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert [d["name"] for d in result["diseases"]] == list(LABELS) and result["queries"] == []
    heat = read_volume(out / result["diseases"][0]["heatmap"], validate=False)
    assert heat.array.shape[1:] == (32, 32) and heat.array.shape[0] % 16 == 8  # 150 mm > 128 mm: 1.5 windows
    assert (out / "overview.png").is_file()


def test_locate_and_info(weights, ct_path, capsys):
    code, out, err = run_cli(["locate", ct_path, "nodule", "effusion", "--model", weights, "--json", "--top-k", "2",
                              "--no-progress"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [q["text"] for q in data["queries"]] == ["nodule", "effusion"]
    assert all(len(q["slices"]) == 2 for q in data["queries"])
    code, out, _ = run_cli(["locate", ct_path, "nodule", "--model", weights, "--no-progress"], capsys)
    assert code == 0 and "slice" in out
    code, out, _ = run_cli(["info", "--model", weights, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["labels"] == list(LABELS) and info["model"]["name"] == "tiny-hybrid"
    assert info["device"] == "cpu" or info["device"].startswith("cuda")
    assert info["antialias"] is False  # the tiny model resamples without the prefilter
    code, out, _ = run_cli(["info", "--model", weights, "--device", "cpu"], capsys)
    assert code == 0 and "Lung nodule" in out and "anti-aliased" not in out


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp / "nope.nii.gz"
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    files["corrupt"] = corrupt
    img2d = sitk.GetImageFromArray(np.zeros((64, 64), np.int16))
    sitk.WriteImage(img2d, str(tmp / "flat.nii.gz"))
    files["2d"] = tmp / "flat.nii.gz"
    img4d = sitk.GetImageFromArray(np.zeros((3, 20, 32, 32), np.int16))
    sitk.WriteImage(img4d, str(tmp / "four.nii.gz"))
    files["4d"] = tmp / "four.nii.gz"
    rgb = sitk.GetImageFromArray(np.zeros((20, 32, 32, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp / "rgb.mha"))
    files["rgb"] = tmp / "rgb.mha"
    mr = np.random.default_rng(0).integers(0, 255, size=(24, 32, 32)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(mr), str(tmp / "mr.nii.gz"))
    files["non_ct"] = tmp / "mr.nii.gz"
    return files


def test_bad_inputs_exit_2_with_one_line(tmp_path, weights, ct_path, capsys):
    for name, path in _bad_inputs(tmp_path).items():
        code, _, err = run_cli(["analyze", path, "--model", weights, "--out", tmp_path / name, "--no-progress"],
                               capsys)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    empty = tmp_path / "empty_weights"
    empty.mkdir()
    cases = [
        ["analyze", ct_path, "--model", weights, "--query", "   ", "--no-progress"],
        ["analyze", ct_path, "--model", weights, "--query", "", "--no-progress"],
        ["analyze", ct_path, "--model", empty, "--no-progress"],
        ["analyze", ct_path, "--model", tmp_path / "no_such_weights", "--no-progress"],
        ["analyze", ct_path, "--model", weights, "--labels", "Not a disease", "--no-progress"],
        ["locate", ct_path, "  ", "--model", weights, "--no-progress"],
        ["info", "--model", empty],
    ]
    if not torch.cuda.is_available():
        cases.append(["info", "--model", weights, "--device", "cuda"])
    for argv in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_analyze_checks_its_output_folder_first_and_leaves_none_behind(tmp_path, weights, ct_path, capsys,
                                                                        monkeypatch):
    import ctvl.inference

    def no_model(*_a, **_k):  # the checks below must fail before the model loads
        raise AssertionError("the model was loaded before the output folder was checked")

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv, problem in [(["--out", blocker / "out"], "cannot write the output directory"),
                          (["--out", tmp_path / "o", "--query", "nodule", "--top-k", "0"], "--top-k 0")]:
        with monkeypatch.context() as m:
            m.setattr(ctvl.inference, "load_model", no_model)
            code, _, err = run_cli(["analyze", ct_path, "--model", weights, "--no-progress", *argv], capsys)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    for out in (fresh, kept):  # a run that fails after the check removes the folder it made, not one it found
        code, _, err = run_cli(["analyze", ct_path, "--model", weights, "--labels", "Not a disease", "--out", out,
                                "--no-progress"], capsys)
        assert code == 2 and "unknown label" in err
    assert not fresh.exists() and kept.is_dir()


def test_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ctvl.cli", "analyze", str(tmp_path / "missing.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing.nii.gz" in proc.stderr


@pytest.mark.slow
def test_demo_runs_with_and_without_weights(tmp_path, weights, capsys):
    from ctvl.demo import main as demo_main

    assert demo_main(["--out", str(tmp_path / "a"), "--model", str(tmp_path / "no_weights")]) == 0
    out = capsys.readouterr().out
    assert "Ground truth findings" in out and "mined from the report" in out and "not available" in out
    assert list((tmp_path / "a").glob("*.nii.gz"))
    assert demo_main(["--out", str(tmp_path / "b"), "--model", str(weights), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "True findings vs predicted probabilities" in out and "located slice" in out
    assert (tmp_path / "b" / "analysis" / "overview.png").is_file()
