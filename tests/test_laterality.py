"""ctvl.model.laterality and ctvl.prompts.snippet_side: the token columns on the side a finding names."""

from __future__ import annotations

import pytest
import torch
from ctvl.model.joint import label_depth_evidence
from ctvl.model.laterality import body_midline, side_columns
from ctvl.prompts import snippet_side

WINDOW = (-1000.0, 1000.0)


def _body(width: int, start: int, stop: int) -> torch.Tensor:
    """[D,H,W] windowed image: air, with a body (0 HU) in columns start..stop-1."""
    x = torch.zeros(4, 6, width)
    x[..., start:stop] = 0.5
    return x


@pytest.mark.parametrize("text, side", [
    ("Nodule in the right upper lobe, 11 mm (series 3, image 45)", "right"),
    ("Solid nodule measuring 16 mm in the LEFT upper lobe", "left"),
    ("Bilateral pleural effusion, larger on the right", None),
    ("Nodules in both lower lobes", None),
    ("Right hilar and left paratracheal lymph nodes", None),
    ("Small nodule in the lingula", None),
    ("The nodule was brighter", None),  # 'bright' is no side
])
def test_snippet_side(text, side):
    assert snippet_side(text) == side


def test_body_midline_is_the_body_centroid_not_the_grid_centre():
    assert body_midline(_body(16, 2, 10), WINDOW) == pytest.approx(5.5)
    assert body_midline(torch.zeros(2, 2, 9), WINDOW) == 4.0  # no body: the grid's centre


def test_side_columns_split_at_the_midline_and_share_the_straddling_token():
    x = _body(16, 0, 16)  # midline 7.5; tokens of 4 columns have centres 1.5, 5.5, 9.5, 13.5
    right, left = side_columns(x, "right", 4, WINDOW), side_columns(x, "left", 4, WINDOW)
    assert right.tolist() == [True, True, False, False]  # w runs toward the patient's left
    assert left.tolist() == [False, False, True, True]
    shifted = _body(16, 0, 12)  # midline 5.5: the token centred on it counts on both sides
    assert side_columns(shifted, "right", 4, WINDOW).tolist() == [True, True, False, False]
    assert side_columns(shifted, "left", 4, WINDOW).tolist() == [False, True, True, True]
    assert side_columns(x, None, 4, WINDOW) is None
    with pytest.raises(ValueError, match="side"):
        side_columns(x, "anterior", 4, WINDOW)


def test_label_depth_evidence_takes_the_peak_on_the_named_side_only():
    heat = torch.zeros(1, 3, 2, 4)  # [L, d, h, w]
    heat[0, 0, 1, 3] = 5.0  # a left-sided peak at depth 0
    heat[0, 2, 0, 0] = 2.0  # a right-sided one at depth 2
    assert label_depth_evidence(heat).tolist() == [5.0, 0.0, 2.0]
    right = torch.tensor([True, True, False, False])
    assert label_depth_evidence(heat, right).tolist() == [0.0, 0.0, 2.0]
