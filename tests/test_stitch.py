"""ctvl.model.stitch: shift-and-stitch heatmaps finer than the token grid (geometry by hand, the model's use)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ctvl.errors import CTVLWeightsError
from ctvl.model.stitch import shift_input, stitch_offsets, stitched, stitched_ijk_to_ras


def test_shift_input_moves_the_content_and_fills_with_the_edge():
    x = torch.arange(5.0)[None, None, :].repeat(2, 3, 1)[None, None]  # [1,1,2,3,5], value = W index
    y = shift_input(x, (0, 0, 2))
    assert y[0, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 4.0, 4.0]
    z = torch.arange(4.0)[:, None, None].repeat(1, 2, 2)[None, None]  # value = D index
    assert shift_input(z, (1, 0, 0))[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 3.0, 3.0]
    assert torch.equal(shift_input(x, (0, 0, 0)), x)


def test_offsets_are_whole_fractions_of_the_token():
    assert stitch_offsets((2, 4, 4), (1, 1, 1)) == [(0, 0, 0)]
    assert stitch_offsets((2, 4, 4), (1, 2, 4)) == [(0, a, b) for a in (0, 2) for b in (0, 1, 2, 3)]


def test_stitched_box_means_are_the_token_box_at_every_cell():
    """A per-token function (the box mean) stitched n times finer = the box starting at every (p/n)-th voxel,
    clamped at the far edge, which is what a token there would have seen."""
    torch.manual_seed(0)
    patch, n = (2, 4, 4), (2, 2, 4)
    x = torch.rand(1, 1, 4, 8, 8, dtype=torch.float64)
    out = stitched(lambda t: F.avg_pool3d(t, patch, patch), x, patch, n)
    assert out.shape == (1, 1, 4, 4, 8)
    step = [p // k for p, k in zip(patch, n)]
    for f in np.ndindex(*out.shape[2:]):
        idx = [np.clip(np.arange(f[a] * step[a], f[a] * step[a] + patch[a]), 0, x.shape[2 + a] - 1) for a in range(3)]
        want = x[0, 0][np.ix_(*idx)].mean()
        assert float(out[0, 0][f]) == pytest.approx(float(want))
    coarse = stitched(lambda t: F.avg_pool3d(t, patch, patch), x, patch, (1, 1, 1))
    torch.testing.assert_close(coarse, F.avg_pool3d(x, patch, patch))
    torch.testing.assert_close(out[..., ::2, ::2, ::4], coarse)  # the unmoved pass fills every n-th cell


def test_stitched_geometry_puts_cell_f_at_f_times_step_plus_half_a_token():
    model = np.array([[0, 0, -1.5, 10.0], [0, 2.0, 0, -20.0], [3.0, 0, 0, 5.0], [0, 0, 0, 1]])  # permuted axes
    patch, n = (2, 4, 4), (1, 2, 4)
    aff = stitched_ijk_to_ras(model, patch, n)
    for fk, fj, fi in [(0, 0, 0), (3, 5, 7), (1, 0, 2)]:
        voxel_kji = np.array([fk * 2 + 0.5, fj * 2 + 1.5, fi * 1 + 1.5])  # f * p/n + (p - 1)/2
        want = model @ np.array([*voxel_kji[::-1], 1.0])
        np.testing.assert_allclose(aff @ np.array([fi, fj, fk, 1.0]), want)
    token = stitched_ijk_to_ras(model, patch, (1, 1, 1))
    np.testing.assert_allclose(token @ np.array([1, 1, 1, 1.0]), model @ np.array([5.5, 5.5, 2.5, 1.0]))


def _model(**changes):
    from ctvl.model import CTVLModel, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config().replace(dense_head=True, mil_disease=True, dense_stage=0, dense_dim=8, **changes)
    return CTVLModel(cfg).eval()


def test_model_stitched_heatmaps_refine_its_own_label_heatmaps():
    model = _model(heatmap_subdivision=(1, 2, 2))
    labels = ["Lung nodule", "Pleural effusion"]
    x = torch.rand(1, 1, *model.config.input_shape)
    with torch.no_grad():
        pos, neg = model.prompt_embeddings(labels)
        emb = model.encode_image(x)
        coarse = model.disease_heatmap_logits(model.label_tokens(emb), labels, pos, neg, emb.evidence)
        fine = model.stitched_heatmap_logits(x, labels, pos, neg)
        same = model.stitched_heatmap_logits(x, labels, pos, neg, (1, 1, 1))
    d, h, w = model.config.token_grid()
    assert fine.shape == (1, 2, d, 2 * h, 2 * w)
    torch.testing.assert_close(same, coarse)
    torch.testing.assert_close(fine[..., ::2, ::2], coarse)
    assert not torch.allclose(fine[..., 1::2, 1::2], coarse)  # the moved passes see other voxels


@pytest.mark.parametrize("bad", [(1, 3, 1), (0, 1, 1), (1, 1), (1, 16, 1)])
def test_subdivision_must_divide_the_token(bad):
    from ctvl.model import tiny_config

    with pytest.raises(CTVLWeightsError, match="heatmap_subdivision"):
        tiny_config().replace(heatmap_subdivision=bad).validate()
