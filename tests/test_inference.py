"""ctvl.inference: geometry of every output, windows, cancel, text cache, errors (stub model + tiny real model)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ctvl.errors import CTVLCancelled, CTVLInputError, CTVLWeightsError
from ctvl.inference import encode, load_model, plan_windows, resolve_device

from tests.inference_stub import ORIENTATIONS, StubModel, make_volume, voxel_ras

LESION_RAS = np.array([22.0, -12.0, 41.0])
LESION_RADIUS = 7.0


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def lesion_volume(name: str, **kw):
    vol = make_volume(ORIENTATIONS[name], **kw)
    ras = voxel_ras(vol)
    vol.array[:] = -700.0
    vol.array[np.linalg.norm(ras - LESION_RAS, axis=-1) <= LESION_RADIUS] = 300.0
    return vol


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_ramp_in_ras_s_comes_back_exactly_on_the_input_grid(name):
    """Heatmap on the input grid == windowed input where the input is a linear function of RAS S."""
    vol = make_volume(ORIENTATIONS[name], shape_kji=(45, 37, 41) if name != "sagittal_stack" else (41, 37, 45))
    ras = voxel_ras(vol)
    z0 = vol.ijk_to_ras_points((np.array(vol.shape_ijk) - 1) / 2)[0, 2]
    vol.array[:] = 5.0 * (ras[..., 2] - z0)  # HU ramp along S, inside the stub's window
    enc = encode(vol, StubModel())
    heat = enc.heatmap("bright", grid="input")
    assert heat.array.shape == vol.array.shape and heat.array.dtype == np.float32
    np.testing.assert_allclose(heat.ijk_to_ras, vol.ijk_to_ras)
    expected = (vol.array + 1000.0) / 2000.0
    # interior: 12 mm from every face of the input and 1.5 tokens inside the model grid's field of view
    k, j, i = np.indices(vol.array.shape)
    sp = vol.spacing
    margin = np.minimum.reduce([np.minimum(i, vol.shape_ijk[0] - 1 - i) * sp[0],
                                np.minimum(j, vol.shape_ijk[1] - 1 - j) * sp[1],
                                np.minimum(k, vol.shape_ijk[2] - 1 - k) * sp[2]])
    model_ijk = (ras.reshape(-1, 3) - enc.model_ijk_to_ras[:3, 3]) @ np.linalg.inv(enc.model_ijk_to_ras[:3, :3]).T
    shape_ijk = np.array(enc.model_shape[::-1])
    in_fov = np.all((model_ijk >= 3) & (model_ijk <= shape_ijk - 4), axis=1).reshape(vol.array.shape)
    interior = (margin > 12.0) & in_fov
    assert interior.sum() > 500
    np.testing.assert_allclose(heat.array[interior], expected[interior], atol=1e-3)

    # model grid: same function of RAS there too (half a token off would be 0.0075 here)
    mheat = enc.heatmap("bright", grid="model")
    assert mheat.array.shape == enc.model_shape
    mras = voxel_ras(mheat)
    vijk = vol.ras_to_ijk_points(mras.reshape(-1, 3))
    n_ijk = np.array(vol.shape_ijk)
    deep = np.all(np.minimum(vijk, n_ijk - 1 - vijk) * sp > 12.0, axis=1).reshape(mheat.array.shape)
    assert deep.sum() > 200
    np.testing.assert_allclose(mheat.array[deep], (5.0 * (mras[..., 2][deep] - z0) + 1000) / 2000, atol=1e-3)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_lesion_heatmap_peak_and_located_slice_land_on_the_lesion(name):
    vol = lesion_volume(name, shape_kji=(60, 47, 51), spacing_ijk=(1.3, 1.1, 1.7))
    enc = encode(vol, StubModel())
    heat = enc.heatmap("bright", grid="input")
    peak = np.unravel_index(int(np.argmax(heat.array)), heat.array.shape)
    peak_ras = vol.ijk_to_ras_points(np.array(peak[::-1], dtype=float))[0]
    assert np.linalg.norm(peak_ras - LESION_RAS) < 6.0

    mheat = enc.heatmap("bright", grid="model")
    mpeak = np.unravel_index(int(np.argmax(mheat.array)), mheat.array.shape)
    assert np.linalg.norm(mheat.ijk_to_ras_points(np.array(mpeak[::-1], float))[0] - LESION_RAS) < 6.0

    hits = enc.locate("bright", top_k=3)
    assert len(hits) == 3
    best = hits[0]
    assert best.position_mm == pytest.approx(vol.slice_positions_mm()[best.slice])
    assert abs(best.position_mm - LESION_RAS[2]) <= 6.0  # one depth bin = 2 model slices x 3 mm
    positions = [h.position_mm for h in hits]
    assert all(abs(a - b) >= 6.0 for n, a in enumerate(positions) for b in positions[n + 1:])  # NMS
    scores = enc.slice_scores("bright")
    assert scores.shape == (vol.n_slices,) and int(np.argmax(scores)) == best.slice


def test_long_volume_is_encoded_in_overlapping_windows():
    vol = lesion_volume("lps", shape_kji=(90, 30, 30), spacing_ijk=(1.5, 1.5, 1.5))  # 135 mm > 48 mm input
    model = StubModel()
    enc = encode(vol, model)
    assert model.image_calls > 2
    assert enc.model_shape[0] * 3.0 >= 135.0 and enc.tokens.shape[0] == enc.model_shape[0] // 2
    hit = enc.locate("bright", top_k=1)[0]
    assert abs(hit.position_mm - LESION_RAS[2]) <= 6.0
    total, starts = plan_windows(100, 16, 2)
    assert starts[0] == 0 and starts[-1] + 16 == total and total >= 100
    assert all(b - a < 16 for a, b in zip(starts, starts[1:]))  # windows overlap


def test_text_cache_labels_and_probabilities():
    model = StubModel()
    enc = encode(lesion_volume("ras"), model)
    enc.locate("a new free text")
    calls = model.text_calls
    enc.locate("a new free text")
    enc.heatmap("a new free text")
    assert model.text_calls == calls
    probs = enc.disease_probabilities()
    assert list(probs) == list(model.config.labels) and all(0.0 <= p <= 1.0 for p in probs.values())
    assert enc.heatmap("Lung nodule").array.shape == enc.model_shape


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_queries_are_rejected(bad):
    enc = encode(lesion_volume("ras"), StubModel())
    for call in (enc.locate, enc.slice_scores, enc.heatmap):
        with pytest.raises(CTVLInputError):
            call(bad)


def test_cancel_before_between_and_inside_forward():
    vol = lesion_volume("ras", shape_kji=(90, 30, 30), spacing_ijk=(1.5, 1.5, 1.5))
    event = threading.Event()
    event.set()
    with pytest.raises(CTVLCancelled):
        encode(vol, StubModel(), cancel=event)
    model = StubModel()
    with pytest.raises(CTVLCancelled):
        encode(vol, model, cancel=lambda: model.image_calls >= 1)  # stops after the first window
    assert model.image_calls == 1
    n = {"checks": 0}

    def cancel_inside() -> bool:
        n["checks"] += 1
        return model.image_calls >= 1  # set by the first forward, noticed by its own submodule hook

    model = StubModel()
    with pytest.raises(CTVLCancelled):
        encode(vol, model, cancel=cancel_inside)


def test_encode_in_worker_thread_reports_progress():
    seen: list[tuple[float, str]] = []
    out = {}
    vol = lesion_volume("ras")
    worker = threading.Thread(target=lambda: out.setdefault("enc", encode(vol, StubModel(),
                                                                        progress=lambda f, m: seen.append((f, m)))))
    worker.start()
    worker.join(30)
    assert "enc" in out and seen[0][0] == 0.0 and seen[-1][0] == 1.0
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(CTVLInputError, match="cpu"):
            resolve_device("cuda")
    with pytest.raises(CTVLInputError):
        resolve_device("tpu")


# ------------------------------------------------------------------------------------------ the real model
model_mod = pytest.importorskip("ctvl.model", reason="ctvl.model not available")


def _tiny_model():
    if not hasattr(model_mod, "CTVLModel") or not hasattr(model_mod, "save_weights"):
        pytest.skip("ctvl.model has no CTVLModel/save_weights yet")
    from ctvl.model.config import tiny_config

    torch.manual_seed(0)
    return model_mod.CTVLModel(tiny_config()).eval()


def test_tiny_real_model_end_to_end_and_weights_round_trip(tmp_path: Path):
    model = _tiny_model()
    vol = lesion_volume("oblique", shape_kji=(40, 36, 36), spacing_ijk=(4.0, 4.0, 5.0))
    enc = encode(vol, model)
    probs = enc.disease_probabilities()
    assert len(probs) == 18 and all(0.0 <= p <= 1.0 for p in probs.values())
    reference = model.disease_probabilities(enc.pooled[None])[0]  # the model's own zero-shot path
    np.testing.assert_allclose(list(probs.values()), reference.numpy(), atol=1e-5)
    assert enc.heatmap("Lung nodule", grid="model").array.shape == enc.model_shape
    assert enc.heatmap("nodule in the right upper lobe", grid="input").array.shape == vol.array.shape
    assert len(enc.locate("nodule in the right upper lobe", top_k=2)) == 2

    model_mod.save_weights(model, tmp_path / "w")
    loaded = load_model(tmp_path / "w", device="cpu")
    again = encode(vol, loaded).disease_probabilities()
    for label, p in probs.items():
        assert again[label] == pytest.approx(p, abs=1e-4)

    with pytest.raises(CTVLWeightsError):
        load_model(tmp_path / "missing", device="cpu")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "w" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CTVLWeightsError):
        load_model(corrupt, device="cpu")


def test_local_label_tokens_feed_label_heatmaps_and_probabilities():
    from ctvl.model.config import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config().replace(dense_head=True, mil_disease=True, dense_stage=0, dense_dim=8, mil_local=True)
    model = model_mod.CTVLModel(cfg).eval()
    vol = lesion_volume("lps", shape_kji=(40, 30, 30), spacing_ijk=(8.0, 8.0, 8.0))  # 320 mm: several windows
    enc = encode(vol, model)
    assert enc.model_shape[0] > cfg.input_shape[0]
    assert enc.label_tokens is not None and enc.label_tokens.shape == enc.tokens.shape
    pos, neg = enc.prompt_embeddings(["Lung nodule"])
    with torch.no_grad():
        z = model.disease_heatmap_logits(enc.label_tokens[None], ["Lung nodule"], pos, neg)[0, 0]
        free = model.heatmap_logits(enc.tokens[None], enc.text_embedding("a mass"))[0]
    torch.testing.assert_close(enc.token_scores("Lung nodule"), z)
    torch.testing.assert_close(enc.token_scores("a mass"), free)  # free text keeps the dense tokens
    p = enc.disease_probabilities(["Lung nodule"])["Lung nodule"]
    with torch.no_grad():
        mask = torch.as_tensor(enc.valid_bins())[None]
        want = torch.sigmoid(model.final_disease_logits(enc.pooled[None], pos, neg, ["Lung nodule"],
                                                        tokens=enc.label_tokens[None], mask=mask))
    assert p == pytest.approx(float(want), abs=1e-5)


def test_label_heatmaps_on_the_stitched_grid_when_the_model_asks_for_it():
    from ctvl.model.config import tiny_config
    from ctvl.model.stitch import stitched_ijk_to_ras

    torch.manual_seed(0)
    cfg = tiny_config().replace(dense_head=True, mil_disease=True, dense_stage=0, dense_dim=8,
                                heatmap_subdivision=(1, 2, 2))
    model = model_mod.CTVLModel(cfg).eval()
    vol = lesion_volume("lps", shape_kji=(10, 36, 36), spacing_ijk=(4.0, 4.0, 4.0))  # one window
    enc = encode(vol, model)
    assert len(enc.window_starts) == 1
    fine, grid = enc.heatmap_scores("Lung nodule")
    d, h, w = enc.tokens.shape[:3]
    assert fine.shape == (d, 2 * h, 2 * w)
    np.testing.assert_allclose(grid, stitched_ijk_to_ras(enc.model_ijk_to_ras, enc.patch, (1, 2, 2)))
    pos, neg = enc.prompt_embeddings(["Lung nodule"])
    with torch.no_grad():
        want = model.stitched_heatmap_logits(torch.from_numpy(enc.model_input)[None, None], ["Lung nodule"], pos, neg)
    torch.testing.assert_close(fine, want[0, 0])
    torch.testing.assert_close(fine[:, ::2, ::2], enc.token_scores("Lung nodule"))  # the unmoved pass = the tokens
    assert enc.heatmap("Lung nodule", grid="model").array.shape == enc.model_shape
    on_input = enc.heatmap("Lung nodule", grid="input")
    assert on_input.array.shape == vol.array.shape and np.isfinite(on_input.array).all()
    free, free_grid = enc.heatmap_scores("a mass")  # free text stays on the tokens
    assert free.shape == (d, h, w) and np.allclose(free_grid, enc.token_ijk_to_ras())
    plain = model_mod.CTVLModel(cfg.replace(heatmap_subdivision=(1, 1, 1))).eval()
    plain.load_state_dict(model.state_dict())
    assert encode(vol, plain).disease_probabilities() == pytest.approx(enc.disease_probabilities())  # unchanged

    long = encode(lesion_volume("lps", shape_kji=(40, 30, 30), spacing_ijk=(8.0, 8.0, 8.0)), model)  # 320 mm
    assert len(long.window_starts) > 1
    with pytest.raises(CTVLCancelled):  # a worker's cancel stops the passes mid-forward and keeps nothing half-done
        long.prepare_heatmaps(cancel=lambda: True)
    assert long._stitched is None
    seen = []
    long.prepare_heatmaps(progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and len(seen) == len(long.window_starts) + 1
    heat, _ = long.heatmap_scores("Pleural effusion")
    assert heat.shape == (long.tokens.shape[0], 2 * long.tokens.shape[1], 2 * long.tokens.shape[2])
    assert torch.isfinite(heat).all()


def test_blob_readout_evidence_reaches_label_heatmaps_and_probabilities():
    from ctvl.model.config import tiny_config
    from ctvl.model.joint import EVIDENCE_GAIN
    from ctvl.prompts import LABELS

    torch.manual_seed(0)
    cfg = tiny_config().replace(input_blob_scales_mm=(8.0,), mil_disease=True, blob_readout=True)
    model = model_mod.CTVLModel(cfg).eval()
    with torch.no_grad():
        model.evidence_weights[LABELS.index("Lung nodule")] = 3.0
    vol = lesion_volume("lps", shape_kji=(40, 30, 30), spacing_ijk=(8.0, 8.0, 8.0))  # several windows
    enc = encode(vol, model)
    assert enc.evidence is not None and enc.evidence.shape == (*enc.tokens.shape[:3], 1)
    assert float(enc.evidence.max()) > 0  # the lesion is a bright blob
    pos, neg = enc.prompt_embeddings(["Lung nodule"])
    with torch.no_grad():
        plain = model.disease_heatmap_logits(enc.tokens[None], ["Lung nodule"], pos, neg)[0, 0]
    torch.testing.assert_close(enc.token_scores("Lung nodule"), plain + EVIDENCE_GAIN * 3.0 * enc.evidence[..., 0])
    p = enc.disease_probabilities(["Lung nodule"])["Lung nodule"]
    with torch.no_grad():
        mask = torch.as_tensor(enc.valid_bins())[None]
        want = torch.sigmoid(model.final_disease_logits(enc.pooled[None], pos, neg, ["Lung nodule"],
                                                        tokens=enc.tokens[None], mask=mask,
                                                        evidence=enc.evidence[None]))
    assert p == pytest.approx(float(want), abs=1e-5)


def test_locate_adds_the_named_labels_heatmap_peaks_like_the_evaluation():
    from ctvl.model.config import tiny_config
    from ctvl.model.joint import label_depth_evidence

    torch.manual_seed(0)
    cfg = tiny_config().replace(mil_disease=True)
    plain_model = model_mod.CTVLModel(cfg).eval()
    model = model_mod.CTVLModel(cfg.replace(locate_label_weight=2.0)).eval()
    model.load_state_dict(plain_model.state_dict())
    vol = lesion_volume("lps")
    text = "A solid nodule in the right upper lobe."  # names 'Lung nodule'
    plain, grounded = encode(vol, plain_model), encode(vol, model)
    want = plain.bin_scores(text) + 2.0 * label_depth_evidence(grounded.token_scores("Lung nodule")[None]).numpy()
    np.testing.assert_allclose(grounded.bin_scores(text), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grounded.bin_scores("Heart size is normal."), plain.bin_scores("Heart size is normal."),
                               rtol=1e-5, atol=1e-5)
    # the same term as the evaluation's (model.pair_bin_logits with the snippet's labels) on one window
    from ctvl.model.joint import ImageEmbeddings

    assert grounded.tokens.shape[:3] == cfg.token_grid()  # one window: the analysis holds the model's own output
    emb = ImageEmbeddings(grounded.tokens[None], grounded.pooled[None], grounded.bins[None], None, None)
    with torch.no_grad():
        ev = model.pair_bin_logits(emb, model.encode_text([text]), torch.tensor([0]), [("Lung nodule",)])[0]
    np.testing.assert_allclose(grounded.bin_scores(text), ev.numpy(), rtol=1e-4, atol=1e-4)


def test_locate_takes_the_named_labels_peaks_on_the_side_the_text_names_like_the_evaluation():
    from ctvl.model.config import tiny_config
    from ctvl.model.joint import ImageEmbeddings, label_depth_evidence
    from ctvl.model.laterality import side_columns

    torch.manual_seed(0)
    cfg = tiny_config().replace(mil_disease=True, locate_label_weight=2.0)
    both = model_mod.CTVLModel(cfg).eval()
    model = model_mod.CTVLModel(cfg.replace(locate_laterality=True)).eval()
    model.load_state_dict(both.state_dict())
    vol = lesion_volume("lps")
    a, b = encode(vol, both), encode(vol, model)
    pw = cfg.downsample()[2]
    image = torch.from_numpy(b.model_input)
    heat = b.token_scores("Lung nodule")[None]
    for text, side in (("A solid nodule in the right upper lobe.", "right"), ("Nodule, left lower lobe.", "left")):
        cols = side_columns(image, side, pw, cfg.hu_window)
        assert 0 < int(cols.sum()) < cols.numel()
        want = a.bin_scores(text) + 2.0 * (label_depth_evidence(heat, cols) - label_depth_evidence(heat)).numpy()
        np.testing.assert_allclose(b.bin_scores(text), want, rtol=1e-5, atol=1e-5)
        # the evaluation's term (pair_bin_logits with the model's side columns) on the same single window
        emb = ImageEmbeddings(b.tokens[None], b.pooled[None], b.bins[None], None, None)
        owner = torch.tensor([0])
        with torch.no_grad():
            ev = model.pair_bin_logits(emb, model.encode_text([text]), owner, [("Lung nodule",)],
                                       columns=model.side_columns([text], image[None, None], owner))[0]
        np.testing.assert_allclose(b.bin_scores(text), ev.numpy(), rtol=1e-4, atol=1e-4)
    no_side = "A solid nodule in the lingula."
    np.testing.assert_allclose(b.bin_scores(no_side), a.bin_scores(no_side), rtol=1e-6)


def test_repeated_query_reuses_its_bin_scores_and_the_cache_is_bounded(monkeypatch):
    from ctvl import inference
    from ctvl.model.config import tiny_config

    torch.manual_seed(0)
    model = model_mod.CTVLModel(tiny_config()).eval()
    enc = encode(lesion_volume("lps"), model)
    calls = []
    real = model.bin_logits
    monkeypatch.setattr(model, "bin_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = enc.bin_scores("A solid nodule in the right upper lobe.")
    first[:] = 0.0  # the caller's copy: the cache keeps its own
    again = enc.bin_scores("A solid nodule in the right upper lobe.")
    assert len(calls) == 1 and np.abs(again).sum() > 0
    assert [h.slice for h in enc.locate("A solid nodule in the right upper lobe.")] == [
        h.slice for h in enc.locate("A solid nodule in the right upper lobe.")] and len(calls) == 1
    monkeypatch.setattr(inference, "BIN_SCORE_CACHE", 3)
    for n in range(5):
        enc.bin_scores(f"nodule number {n}")
    assert list(enc._bin_scores) == ["nodule number 2", "nodule number 3", "nodule number 4"]  # oldest dropped


def test_locate_refines_a_peak_between_bins_and_leaves_runner_ups_on_its_flank():
    from ctvl.model.config import tiny_config
    from ctvl.tokengrid import refine_peak

    torch.manual_seed(0)
    cfg = tiny_config()
    at_bins = model_mod.CTVLModel(cfg.replace(locate_peak_radius=0)).eval()
    refined = model_mod.CTVLModel(cfg.replace(locate_peak_radius=2)).eval()
    refined.load_state_dict(at_bins.state_dict())
    vol = lesion_volume("ras", shape_kji=(60, 24, 24), spacing_ijk=(6.0, 6.0, 1.5))  # slices finer than the bins
    a, b = encode(vol, at_bins), encode(vol, refined)
    text = "A solid nodule in the right upper lobe."
    bins = a.bin_scores(text)
    np.testing.assert_allclose(b.bin_scores(text), bins, rtol=1e-6)
    plain, moved = a.locate(text, top_k=3), b.locate(text, top_k=3)
    masked = np.where(a.valid_bins(), bins.astype(np.float64), -np.inf)
    z_bins = a.bin_positions_mm()
    best = int(np.argmax(masked))
    assert abs(plain[0].position_mm - z_bins[best]) <= 0.75 + 1e-6  # radius 0: the best bin's centre slice
    z = np.interp(refine_peak(masked, 2), np.arange(len(z_bins)), z_bins)
    assert moved[0].slice == int(np.argmin(np.abs(vol.slice_positions_mm() - z))) and moved[0].score == plain[0].score
    for p, m in zip(plain[1:], moved[1:]):  # runner-ups: moved only when they sit on a peak of their own
        k = int(np.argmin(np.abs(z_bins - p.position_mm)))
        on_flank = any(0 <= n < len(masked) and masked[n] > masked[k] for n in (k - 1, k + 1))
        assert (m.slice == p.slice) if on_flank else abs(m.position_mm - p.position_mm) <= 2 * 6.0 + 1e-6
    assert len({h.slice for h in moved}) == len(moved)


DEMO = Path(__file__).resolve().parents[1] / "CTVLExtension" / "Logic" / "weights" / "demo"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="embedded demo weights not trained yet")
@pytest.mark.xfail(strict=False, reason="the current demo model misses its quality targets (issue 3, see README "
                   "results): its nodule heatmap and locate are not reliable yet")
def test_demo_model_finds_a_phantom_lesion():
    from ctvl.phantom import generate_case

    case = generate_case(seed=7, index=0, force_labels=["Lung nodule"])
    nodules = [f for f in case.findings if f.label == "Lung nodule"]
    finding = max(nodules, key=lambda f: f.size_mm or 0.0)
    enc = encode(case.volume, load_model("demo", device="cpu"))
    heat = enc.heatmap("Lung nodule", grid="input").array
    assert case.mask.flat[int(np.argmax(heat))] in {f.mask_value for f in nodules}  # peak inside a nodule
    hit = enc.locate(finding.sentence, top_k=1)[0]
    lo, hi = finding.slice_range
    assert lo - 2 <= hit.slice <= hi + 2


@pytest.mark.parametrize("name", ["ras", "lps", "inferior_first", "sagittal_stack"])
def test_fast_input_grid_path_matches_the_generic_resampler(name):
    from ctvl.geometry import Volume as Vol
    from ctvl.geometry import resample

    vol = lesion_volume(name, shape_kji=(33, 29, 45), spacing_ijk=(2.1, 1.7, 2.9))  # wider than the model FOV
    enc = encode(vol, StubModel())
    scores = enc.token_scores("a free text")
    fast = enc.heatmap("a free text", grid="input").array
    ref = resample(Vol(scores.numpy(), enc.token_ijk_to_ras()), vol.ijk_to_ras, vol.array.shape, order=1,
                   fill=float(scores.min())).array
    assert (ref == float(scores.min())).any()  # some voxels lie outside the model grid
    np.testing.assert_allclose(fast, ref, atol=1e-5)


def test_no_state_left_on_or_kept_for_the_model():
    import gc
    import weakref

    model = StubModel()
    encode(lesion_volume("ras"), model).locate("bright")
    assert not [k for k in vars(model) if k.startswith("_ctvl")]
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("shape", [(32, 32), (2, 8, 16, 16), (8, 16, 16, 3), (1, 16, 16)])
def test_encode_rejects_non_3d_volumes(shape):
    from ctvl.geometry import Volume as Vol

    with pytest.raises(CTVLInputError):
        encode(Vol(np.zeros(shape, np.float32)), StubModel())


def test_encode_preprocesses_as_the_model_was_trained():
    """`ModelConfig.input_antialias` reaches inference: the encoder sees the prefiltered image, as in training."""
    from ctvl.geometry import to_model_space

    vol = lesion_volume("lps", shape_kji=(30, 40, 40), spacing_ijk=(1.0, 1.0, 1.5))  # finer than the 3-mm model grid
    model = StubModel()
    plain = encode(vol, model).model_input
    model.config.input_antialias = True  # an instance attribute: the class's other models stay as they are
    smoothed = encode(vol, model).model_input
    spacing, shape, window = model.config.spacing, model.config.input_shape, model.config.hu_window
    want, _ = to_model_space(vol, spacing, (smoothed.shape[0], *shape[1:]), window, antialias_input=True)
    np.testing.assert_allclose(smoothed, want, atol=1e-6)
    assert np.abs(smoothed - plain).max() > 0.05
