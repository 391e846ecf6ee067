"""training.losses against numpy references; masking; gradients; 2-process gloo SigLIP == single process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

from training.losses import (
    LossConfig,
    combined_loss,
    disease_prompt_loss,
    localization_loss,
    mil_disease_loss,
    siglip_loss,
    slice_to_bin,
    soft_bin_target,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------- SigLIP
def test_siglip_matches_numpy():
    img, txt = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    scale, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = siglip_loss(img, txt, scale, bias).item()
    z = 10.0 * img.numpy() @ txt.numpy().T - 10.0
    labels = 2 * np.eye(4) - 1
    want = -_log_sigmoid(labels * z).sum() / 4
    assert got == pytest.approx(want, rel=1e-10)


def test_siglip_gradients_flow():
    img = _unit(3, 5, seed=3).requires_grad_()
    txt = _unit(3, 5, seed=4).requires_grad_()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(img, txt, scale, bias).backward()
    for t in (img, txt, scale, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert bias.grad < 0  # at b=-10 every pair is predicted negative: the positives pull b up


# ----------------------------------------------------------------------------- disease prompts
def test_disease_prompt_loss_matches_numpy_and_masks():
    pooled, pos, neg = _unit(3, 6, seed=5), _unit(2, 6, seed=6), _unit(2, 6, seed=7)
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, -0.25], dtype=torch.float64)
    got = disease_prompt_loss(pooled, pos, neg, labels, math.log(7.0), bias).item()
    p, q, n = pooled.numpy(), pos.numpy(), neg.numpy()
    logits = 7.0 * (p @ q.T - p @ n.T) + bias.numpy()
    y = labels.numpy()
    terms = [-(y[i, j] * _log_sigmoid(logits[i, j]) + (1 - y[i, j]) * _log_sigmoid(-logits[i, j]))
             for i in range(3) for j in range(2) if np.isfinite(y[i, j]) and y[i, j] >= 0]
    assert len(terms) == 4
    assert got == pytest.approx(np.mean(terms), rel=1e-10)


def test_disease_prompt_loss_missing_labels_get_no_gradient():
    pooled = _unit(2, 4, seed=8).requires_grad_()
    pos, neg = _unit(1, 4, seed=9), _unit(1, 4, seed=10)
    labels = torch.tensor([[1.0], [float("nan")]], dtype=torch.float64)
    loss = disease_prompt_loss(pooled, pos, neg, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert pooled.grad[0].abs().sum() > 0 and pooled.grad[1].abs().sum() == 0
    all_missing = disease_prompt_loss(pooled, pos, neg, torch.full((2, 1), float("nan"), dtype=torch.float64))
    assert all_missing.item() == 0.0


# ----------------------------------------------------------------------------- localisation
def _np_localization(bins, valid, snip, target, sigma, tau, end=None):
    out = []
    for m in range(len(snip)):
        idx = np.arange(bins.shape[1], dtype=float)
        if end is None or end[m] - target[m] < 1e-3:
            q = np.exp(-0.5 * ((idx - target[m]) / sigma) ** 2)
        else:
            s = sigma * math.sqrt(2)
            q = 0.5 * (erf((end[m] - idx) / s) - erf((target[m] - idx) / s))
        q = q * valid[m]
        q = q / q.sum()
        z = bins[m] @ snip[m] / tau
        z = np.where(valid[m], z, -np.inf)
        logp = z - (np.log(np.exp(z[valid[m]] - z[valid[m]].max()).sum()) + z[valid[m]].max())
        out.append(-(q[valid[m]] * logp[valid[m]]).sum())
    return float(np.mean(out))


def test_localization_loss_matches_numpy():
    bins, snip = _unit(2, 6, 5, seed=11), _unit(2, 5, seed=12)
    valid = torch.tensor([[True] * 6, [False, True, True, True, True, False]])
    target = torch.tensor([2.3, 1.0], dtype=torch.float64)
    got = localization_loss(bins, valid, snip, target, sigma_bins=1.5, tau=0.1).item()
    want = _np_localization(bins.numpy(), valid.numpy(), snip.numpy(), target.numpy(), 1.5, 0.1)
    assert got == pytest.approx(want, rel=1e-6)
    end = torch.tensor([4.0, 1.0], dtype=torch.float64)  # a range for row 0, a point for row 1
    got = localization_loss(bins, valid, snip, target, sigma_bins=1.5, tau=0.1, target_end=end).item()
    want = _np_localization(bins.numpy(), valid.numpy(), snip.numpy(), target.numpy(), 1.5, 0.1, end.numpy())
    assert got == pytest.approx(want, rel=1e-6)


def test_soft_target_range_is_uniform_convolved_with_gaussian():
    q = soft_bin_target(torch.tensor([3.0]), 12, 1.0, target_end=torch.tensor([7.0]))[0].numpy()
    xs = np.linspace(3.0, 7.0, 4001)
    ref = np.exp(-0.5 * (np.arange(12)[:, None] - xs[None]) ** 2).sum(1)
    np.testing.assert_allclose(q, ref / ref.sum(), atol=1e-4)
    assert q.argmax() in (4, 5, 6) and q[5] == pytest.approx(q.max())


def test_localization_masking_and_gradient():
    bins = _unit(1, 5, 4, seed=13).requires_grad_()
    snip = _unit(2, 4, seed=14).requires_grad_()
    valid = torch.tensor([[True, True, True, False, False]])
    vol = torch.tensor([0, 0])
    target = torch.tensor([1.0, 4.0])  # second snippet cites an invalid (padded) bin far from valid ones
    loss = localization_loss(bins, valid, snip, target, sigma_bins=0.3, volume_index=vol)
    loss.backward()
    assert torch.isfinite(loss) and snip.grad[0].abs().sum() > 0
    assert bins.grad[0, 3:].abs().sum() == 0  # invalid bins get no gradient
    # the soft target lives on valid bins only and the model is pushed toward the cited bin
    assert soft_bin_target(target, 5, 0.3, valid_mask=valid.expand(2, -1))[0, 3:].sum() == 0
    assert slice_to_bin(6.0, 4) == pytest.approx(1.125)


def test_localization_learns_the_cited_bin():
    bins = torch.eye(8, dtype=torch.float64)[None]  # 8 distinguishable bins
    snip = _unit(1, 8, seed=15).clone().requires_grad_()
    opt = torch.optim.SGD([snip], lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        localization_loss(bins, None, F.normalize(snip, dim=-1), torch.tensor([5.0]), 1.0).backward()
        opt.step()
    assert int((bins[0] @ F.normalize(snip[0].detach(), dim=-1)).argmax()) == 5


# ----------------------------------------------------------------------------- MIL (token-level) disease
def _np_mil_loss(tokens, pos, neg, labels, t, bias, r, token_mask=None, n_ref=None):
    b, e = tokens.shape[0], tokens.shape[-1]
    tok = tokens.reshape(b, -1, e)
    tok = tok / np.linalg.norm(tok, axis=-1, keepdims=True)
    terms = []
    for i in range(b):
        keep = np.ones(tok.shape[1], bool) if token_mask is None else token_mask[i].reshape(-1)
        for j in range(pos.shape[0]):
            y = labels[i, j]
            if not (np.isfinite(y) and 0 <= y <= 1):
                continue
            z = t * (tok[i][keep] @ pos[j] - tok[i][keep] @ neg[j]) + bias[j]
            n = keep.sum() if n_ref is None else n_ref
            m = (r * z).max()
            logit = (m + np.log(np.exp(r * z - m).sum()) - np.log(n)) / r
            terms.append(-(y * _log_sigmoid(logit) + (1 - y) * _log_sigmoid(-logit)))
    return np.mean(terms)


def test_mil_disease_loss_matches_numpy_with_masks():
    g = torch.Generator().manual_seed(40)
    tokens = torch.randn(2, 3, 2, 2, 6, generator=g, dtype=torch.float64) * 3  # not normalised
    pos, neg = _unit(2, 6, seed=41), _unit(2, 6, seed=42)
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0], dtype=torch.float64)
    args = (tokens.numpy(), pos.numpy(), neg.numpy(), labels.numpy(), 7.0, bias.numpy(), 5.0)
    got = mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias, r=5.0).item()
    assert got == pytest.approx(_np_mil_loss(*args), rel=1e-10)
    bins_ok = torch.tensor([[True, True, False], [True, False, False]])  # depth-bin mask (padding)
    got = mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias, r=5.0, token_mask=bins_ok, n_ref=12).item()
    tmask = bins_ok[:, :, None, None].expand(2, 3, 2, 2).numpy()
    assert got == pytest.approx(_np_mil_loss(*args, token_mask=tmask, n_ref=12), rel=1e-10)


def test_mil_extra_token_logits_add_to_z():
    g = torch.Generator().manual_seed(47)
    tokens = torch.randn(2, 3, 2, 2, 6, generator=g, dtype=torch.float64)
    pos, neg = _unit(2, 6, seed=48), _unit(2, 6, seed=49)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0], dtype=torch.float64)
    shift = torch.tensor([1.5, -0.25], dtype=torch.float64)
    const = shift[None, :, None, None, None].expand(2, 2, 3, 2, 2)  # a per-label constant: the same as a bias
    got = mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias, extra=const).item()
    assert got == pytest.approx(mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias + shift).item(),
                                rel=1e-12)
    extra = torch.randn(2, 2, 3, 2, 2, generator=g, dtype=torch.float64)  # per token: not a bias
    direct = mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias, extra=extra)
    assert direct.item() != pytest.approx(mil_disease_loss(tokens, pos, neg, labels, math.log(7.0), bias).item())
    total, _ = combined_loss(LossConfig(siglip=False, disease=False, mil=True, localization=False), tokens=tokens,
                             pos_emb=pos, neg_emb=neg, labels=labels, mil_log_scale=math.log(7.0), mil_bias=bias,
                             mil_extra=extra)
    assert total.item() == pytest.approx(direct.item(), rel=1e-12)


def test_mil_smooth_max_localises_the_gradient():
    # one token aligned with the positive prompt: the loss for a positive label pulls mostly on that token
    pos, neg = _unit(1, 6, seed=43), _unit(1, 6, seed=44)
    tokens = _unit(1, 2, 4, 4, 6, seed=45).clone()
    tokens[0, 1, 2, 3] = F.normalize(pos[0] - neg[0] + 0.7 * _unit(6, seed=46), dim=-1)  # high z, not parallel
    tokens.requires_grad_()
    mil_disease_loss(tokens, pos, neg, torch.ones(1, 1, dtype=torch.float64), r=5.0).backward()
    gnorm = tokens.grad.norm(dim=-1)[0]
    assert gnorm.flatten().argmax().item() == np.ravel_multi_index((1, 2, 3), (2, 4, 4))
    assert gnorm[1, 2, 3] > 5 * gnorm.sum() / gnorm.numel()


# ----------------------------------------------------------------------------- combined
def test_combined_loss_switches_and_weights():
    img, rep = _unit(3, 6, seed=16), _unit(3, 6, seed=17)
    pos, neg = _unit(2, 6, seed=18), _unit(2, 6, seed=19)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    bins, snip = _unit(3, 4, 6, seed=20), _unit(3, 6, seed=21)
    scale, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    kw = dict(img_pooled=img, report_emb=rep, logit_scale=scale, logit_bias=bias, pos_emb=pos, neg_emb=neg,
              labels=labels, bins=bins, snippet_emb=snip, target_bin=torch.tensor([0.0, 1.5, 3.0]))
    total, parts = combined_loss(LossConfig(disease_weight=2.0), **kw)
    assert set(parts) == {"siglip", "disease", "localization"}
    assert total.item() == pytest.approx(sum(parts.values()))
    assert parts["disease"] == pytest.approx(2 * disease_prompt_loss(img, pos, neg, labels).item())
    _, parts = combined_loss(LossConfig(siglip=False, localization=False), **kw)
    assert set(parts) == {"disease"}
    tokens = _unit(3, 2, 2, 2, 6, seed=22)
    _, parts = combined_loss(LossConfig(mil_weight=0.5), tokens=tokens, mil_r=4.0, **kw)
    assert set(parts) == {"siglip", "disease", "mil", "localization"}
    assert parts["mil"] == pytest.approx(0.5 * mil_disease_loss(tokens, pos, neg, labels, r=4.0).item())
    with pytest.raises(ValueError):
        combined_loss(LossConfig(siglip=False, disease=False, localization=False), **kw)


# ----------------------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img_all, txt_all = _unit(8, 6, seed=30), _unit(8, 6, seed=31)
        b = 8 // world
        img = img_all[rank * b:(rank + 1) * b].clone().requires_grad_()
        txt = txt_all[rank * b:(rank + 1) * b].clone().requires_grad_()
        scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
        loss = siglip_loss(img, txt, scale, bias)
        loss.backward()
        # what DDP does: average parameter gradients over ranks; report the mean loss
        stats = torch.stack([loss.detach(), scale.grad, bias.grad]) / world
        dist.all_reduce(stats)
        grads = torch.cat([img.grad, txt.grad], dim=1) / world  # d(global loss)/d(local rows)
        parts = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(parts, grads)
        if rank == 0:
            torch.save({"stats": stats, "grads": torch.cat(parts)}, out_file)
    finally:
        dist.destroy_process_group()


def test_siglip_ddp_two_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    img = _unit(8, 6, seed=30).requires_grad_()
    txt = _unit(8, 6, seed=31).requires_grad_()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    loss = siglip_loss(img, txt, scale, bias)
    loss.backward()
    torch.testing.assert_close(res["stats"], torch.stack([loss.detach(), scale.grad, bias.grad]))
    torch.testing.assert_close(res["grads"], torch.cat([img.grad, txt.grad], dim=1))


def test_guided_token_mask_keeps_positive_cited_labels_near_their_citations():
    from training.losses import guided_token_mask

    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 2:5] = False
    labels = torch.tensor([[0.0, 1.0, float("nan")], [1.0, 0.0, 1.0]])
    guide = torch.tensor([[0, 1, 2.0], [0, 1, 6.4], [0, 0, 5.0], [0, 2, 1.0], [1, 2, 3.0], [1, 0, 0.5]])
    m = guided_token_mask(guide, labels, valid, margin_bins=1.0)
    assert m.shape == (2, 3, 8)
    assert m[0, 1].nonzero().flatten().tolist() == [1, 2, 3, 6, 7]  # |bin - 2| <= 1 or |bin - 6.4| <= 1
    assert m[0, 0].all() and m[0, 2].all()  # a negative or missing label pools over the whole scan
    assert torch.equal(m[1, 2], valid[1])  # its citation falls on padding: back to every valid bin
    assert m[1, 0].nonzero().flatten().tolist() == [0, 1]
    assert torch.equal(m[1, 1], valid[1])
    none = guided_token_mask(torch.zeros(0, 3), labels, valid)
    assert torch.equal(none, valid[:, None, :].expand(2, 3, 8))


def test_mil_logits_pool_each_label_over_its_own_bins():
    from ctvl.model.joint import mil_disease_logits

    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 4, 2, 3, 8, generator=g, dtype=torch.float64)
    pos, neg = _unit(3, 8, seed=4), _unit(3, 8, seed=5)
    mask = torch.rand(2, 3, 4, generator=g) > 0.4
    mask[:, :, 0] = True
    got = mil_disease_logits(tokens, pos, neg, math.log(10.0), None, r=5.0, mask=mask, n_ref=24)
    z = 10.0 * torch.einsum("bdhwe,le->bldhw", F.normalize(tokens, dim=-1), pos - neg)
    for b in range(2):
        for lab in range(3):
            sel = z[b, lab][mask[b, lab]].reshape(-1)
            want = (torch.logsumexp(5.0 * sel, 0) - math.log(24)) / 5.0
            assert got[b, lab] == pytest.approx(float(want), rel=1e-5)
