"""ctvl.model.guidance: label heatmaps sharpened by the label's input x gradient (formula, geometry, uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ctvl.errors import CTVLCancelled, CTVLWeightsError
from ctvl.inference import encode
from ctvl.model import CTVLModel
from ctvl.model.config import tiny_config
from ctvl.model.guidance import guided_heatmap, label_attribution, to_model_grid
from ctvl.model.stitch import stitched_ijk_to_ras

from tests.test_inference import lesion_volume

LABELS2 = ["Lung nodule", "Atelectasis"]


def _model(**changes) -> CTVLModel:
    torch.manual_seed(0)
    cfg = tiny_config().replace(dense_head=True, mil_disease=True, dense_stage=0, dense_dim=8, **changes)
    return CTVLModel(cfg).eval()


def test_attribution_is_input_times_gradient_of_each_label_mil_logit():
    model = _model()
    torch.manual_seed(1)
    x = torch.rand(1, 1, *model.config.input_shape)
    x[..., :6, :, :] = 0.0  # no intensity, no attribution (input x gradient)
    pos, neg = model.prompt_embeddings(LABELS2)
    with torch.no_grad():  # gradients are on inside, whatever the caller's mode
        a = label_attribution(model, x, LABELS2, pos, neg)
    assert a.shape == (2, *model.config.input_shape)
    assert (a >= 0).all() and (a[:, :5] == 0).all() and (a[:, 7:] > 0).any()
    assert all(p.grad is None for p in model.parameters())  # the weights are not touched
    xg = x.clone().requires_grad_(True)  # by hand, label 1: relu(x * dz/dx), then the 3-voxel mean
    emb = model.encode_image(xg)
    z = model.mil_logits(model.label_tokens(emb), pos[1:], neg[1:], LABELS2[1:])[0, 0]
    (g,) = torch.autograd.grad(z, xg)
    raw = (g * x).clamp_min(0)[0]
    want = torch.nn.functional.avg_pool3d(raw, 3, 1, 1, count_include_pad=False)[0]
    torch.testing.assert_close(a[1], want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="one input"):
        label_attribution(model, x.repeat(2, 1, 1, 1, 1), LABELS2, pos, neg)


def test_guided_map_is_the_coarse_sigmoid_times_the_normalised_attribution():
    coarse = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])
    attribution = torch.tensor([[4.0, 0.0], [2.0, 1.0]])
    out = guided_heatmap(coarse, attribution)
    torch.testing.assert_close(out, torch.sigmoid(coarse) * attribution / 4.0)
    assert int(out.argmax()) == 2  # neither the coarse maximum (3) nor the attribution's (0)
    torch.testing.assert_close(guided_heatmap(coarse, torch.zeros(2, 2)), torch.sigmoid(coarse))


def test_to_model_grid_puts_each_cell_at_its_centre_voxel():
    """Cell f of a stitched map lies at model voxel f * p/n + (p - 1)/2 (`stitched_ijk_to_ras`): a map equal to its
    cell index reads (v - (p - 1)/2) / (p/n) at model voxel v, and the edge value beyond the outer centres."""
    patch, sub, shape = (2, 4, 4), (1, 2, 4), (8, 16, 16)
    d, h, w = (s // p * n for s, p, n in zip(shape, patch, sub))
    ramp = torch.arange(w, dtype=torch.float32).expand(d, h, w)
    out = to_model_grid(torch.stack([ramp, -ramp]), patch, sub, shape)
    assert out.shape == (2, *shape)
    v = np.arange(shape[2])
    want = np.clip((v - 1.5) / 1.0, 0, w - 1)
    np.testing.assert_allclose(out[0, 3, 5].numpy()[2:-2], want[2:-2], atol=1e-5)
    ramp_d = torch.arange(d, dtype=torch.float32)[:, None, None].expand(d, h, w)
    col = to_model_grid(ramp_d[None], patch, sub, shape)[0, :, 7, 7].numpy()
    np.testing.assert_allclose(col[1:-1], ((np.arange(shape[0]) - 0.5) / 2.0)[1:-1], atol=1e-5)


def test_config_names_a_known_mode_and_needs_the_mil_logit():
    tiny_config().replace(mil_disease=True, heatmap_guidance="input_x_gradient").validate()
    with pytest.raises(CTVLWeightsError, match="heatmap_guidance"):
        tiny_config().replace(mil_disease=True, heatmap_guidance="gradcam").validate()
    with pytest.raises(CTVLWeightsError, match="needs mil_disease"):
        tiny_config().replace(heatmap_guidance="input_x_gradient").validate()


def test_encoding_serves_guided_label_heatmaps_on_the_model_grid():
    model = _model(heatmap_subdivision=(1, 2, 2), heatmap_guidance="input_x_gradient")
    vol = lesion_volume("lps", shape_kji=(10, 36, 36), spacing_ijk=(4.0, 4.0, 4.0))  # one window
    enc = encode(vol, model)
    assert len(enc.window_starts) == 1 and enc.guidance() == "input_x_gradient"
    heat, grid = enc.heatmap_scores("Lung nodule")
    assert heat.shape == enc.model_shape and np.array_equal(grid, enc.model_ijk_to_ras)
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    pos, neg = enc.prompt_embeddings(["Lung nodule"])  # the same map from the model's parts
    x = torch.from_numpy(enc.model_input)[None, None]
    with torch.no_grad():
        stitched = model.stitched_heatmap_logits(x, ["Lung nodule"], pos, neg)[0]
    coarse = to_model_grid(stitched, enc.patch, (1, 2, 2), enc.model_shape)[0]
    want = guided_heatmap(coarse, label_attribution(model, x, ["Lung nodule"], pos, neg)[0])
    torch.testing.assert_close(heat, want, rtol=1e-4, atol=1e-6)
    model_grid = enc.heatmap("Lung nodule", grid="model")
    assert np.array_equal(model_grid.array, heat.numpy()) and np.array_equal(model_grid.ijk_to_ras, grid)
    on_input = enc.heatmap("Lung nodule", grid="input")
    assert on_input.array.shape == vol.array.shape and np.isfinite(on_input.array).all()
    free, free_grid = enc.heatmap_scores("a mass")  # free text stays on the tokens
    assert free.shape == enc.tokens.shape[:3] and np.allclose(free_grid, enc.token_ijk_to_ras())
    plain = _model(heatmap_subdivision=(1, 2, 2))
    plain.load_state_dict(model.state_dict())
    assert encode(vol, plain).disease_probabilities() == pytest.approx(enc.disease_probabilities())  # unchanged


def test_guided_heatmaps_are_prepared_with_progress_and_cancel_across_windows():
    model = _model(heatmap_guidance="input_x_gradient")
    long = encode(lesion_volume("lps", shape_kji=(40, 30, 30), spacing_ijk=(8.0, 8.0, 8.0)), model)  # 320 mm
    assert len(long.window_starts) > 1
    with pytest.raises(CTVLCancelled):  # a worker's cancel stops the passes mid-forward and keeps nothing half-done
        long.prepare_heatmaps(cancel=lambda: True, labels=LABELS2)
    assert long._guided == {}
    seen = []
    long.prepare_heatmaps(progress=lambda f, m: seen.append((f, m)), labels=LABELS2)
    assert seen[-1][0] == 1.0 and any("guided" in m for _, m in seen)
    assert sorted(long._guided) == sorted(LABELS2)
    heat, _ = long.heatmap_scores("Atelectasis")
    assert heat.shape == long.model_shape and torch.isfinite(heat).all()
    assert heat is long._guided["Atelectasis"]  # prepared once, served as is
    with pytest.raises(Exception, match="no label heatmap"):
        long._guided_label_heatmaps(["not a label"])


def test_stitched_geometry_is_what_to_model_grid_inverts():
    """to_model_grid resamples through stitched_ijk_to_ras with the model grid as identity: a model affine with
    spacing and origin changes nothing in index space."""
    aff = np.diag([0.7, 0.7, 2.5, 1.0])
    aff[:3, 3] = [-100.0, 20.0, 5.0]
    a = np.linalg.inv(aff) @ stitched_ijk_to_ras(aff, (2, 4, 4), (1, 2, 2))
    np.testing.assert_allclose(a, stitched_ijk_to_ras(np.eye(4), (2, 4, 4), (1, 2, 2)))
