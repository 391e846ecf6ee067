"""Training losses: SigLIP (DDP-correct), disease-prompt BCE, token-level (MIL) disease BCE, snippet->depth-bin
localisation; `combined_loss`.

All inputs are L2-normalised embeddings from `ctvl.model.CTVLModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ctvl.model.joint import disease_logits, mil_disease_logits
from torch import Tensor


# ----------------------------------------------------------------------------- SigLIP
def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (works on gloo and nccl)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        world, rank = _world(group)
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate `x` from all ranks (rank order), differentiable; identity when not distributed."""
    world, _ = _world(group)
    return x if world == 1 else _GatherWithGrad.apply(x, group)


def siglip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, group=None) -> Tensor:
    """Sigmoid loss (Zhai et al. 2023): -1/|B| sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), z_ii = 1, else -1.

    Under DDP each rank scores its local images against the texts of ALL ranks (gathered with gradients) and
    divides by its local batch size; DDP's gradient averaging over W ranks then yields exactly the gradient of the
    global-batch loss (mean over ranks of the returned values = the global loss). Equal batch sizes on all ranks
    are required (use drop_last). img, txt: [B,E] L2-normalised; logit_scale = log t.
    """
    world, rank = _world(group)
    b = img.shape[0]
    txt_all = gather_with_grad(txt, group)
    logits = img @ txt_all.t() * logit_scale.exp() + logit_bias
    labels = -torch.ones_like(logits)
    idx = torch.arange(b, device=img.device)
    labels[idx, rank * b + idx] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b


# ----------------------------------------------------------------------------- disease prompts
def label_mask(labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Valid entries: finite and in [0, 1] (missing labels are NaN or negative), and `mask` if given."""
    valid = torch.isfinite(labels) & (labels >= 0) & (labels <= 1)
    return valid if mask is None else valid & mask.bool()


def disease_prompt_loss(pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor, labels: Tensor,
                        log_scale: Tensor | float = math.log(10.0), bias: Tensor | None = None,
                        mask: Tensor | None = None, pos_weight: Tensor | None = None) -> Tensor:
    """Masked BCE on `ctvl.model.disease_logits` (t*(cos_pos - cos_neg) + bias), mean over valid entries.

    pooled [B,E]; pos_emb, neg_emb [L,E]; labels [B,L] in {0,1} (NaN / -1 = missing); bias [L] or None.
    Pass the model's `disease_logit_scale` and `label_bias(labels)` so training and inference agree.
    """
    logits = disease_logits(pooled, pos_emb, neg_emb, log_scale, bias)
    valid = label_mask(labels, mask)
    target = torch.where(valid, labels, torch.zeros_like(labels)).to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    per = per * valid.to(per.dtype)
    return per.sum() / valid.sum().clamp_min(1).to(per.dtype)


def mil_disease_loss(tokens: Tensor, pos_emb: Tensor, neg_emb: Tensor, labels: Tensor,
                     log_scale: Tensor | float = math.log(10.0), bias: Tensor | None = None, r: float = 5.0,
                     token_mask: Tensor | None = None, n_ref: int | None = None, mask: Tensor | None = None,
                     pos_weight: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """Masked BCE on the LSE-pooled token-level disease logits (`ctvl.model.mil_disease_logits`), mean over valid
    labels: z_l(x) = t*(cos(tok_x,pos_l) - cos(tok_x,neg_l)) + b_l, volume logit (1/r) log(sum_x exp(r z_l(x)) / N).

    tokens [B,d,h,w,E] (encode_image's, any norm); pos/neg [L,E]; labels [B,L] (NaN / -1 = missing);
    token_mask [B,d] (valid depth bins) or [B,d,h,w] bool; n_ref: N (default: number of valid tokens); extra
    [B,L,d,h,w] is added to z (the model's `evidence_logits`).
    Pass the model's `mil_logit_scale`, `label_bias(labels, mil=True)`, `config.mil_r` and
    `prod(config.token_grid())` (or use `combined_loss(model=...)`) so training and inference agree.
    """
    logits = mil_disease_logits(tokens, pos_emb, neg_emb, log_scale, bias, r, token_mask, n_ref, extra)
    valid = label_mask(labels, mask)
    target = torch.where(valid, labels, torch.zeros_like(labels)).to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    per = per * valid.to(per.dtype)
    return per.sum() / valid.sum().clamp_min(1).to(per.dtype)


def guided_token_mask(guide: Tensor, labels: Tensor, bin_valid: Tensor, margin_bins: float = 2.0) -> Tensor:
    """[B,L,d] depth bins each label's MIL pooling may use (report-guided MIL): for a positive label that the
    report's cited snippets name, the valid bins within `margin_bins` of those citations; otherwise every valid bin.

    guide [G,3] rows (volume, label index, fractional bin) (training.data's batch["guide"]); labels [B,L] (1 =
    positive; NaN / -1 missing); bin_valid [B,d] bool. The heatmap's evidence for a finding the report places on
    image 45 must then come from around image 45, not from anywhere in the scan.
    """
    b, d = bin_valid.shape
    n_lab = labels.shape[1]
    valid = bin_valid.bool()
    near = torch.zeros(b * n_lab, d, dtype=torch.float32, device=valid.device)
    if guide.numel():
        row = guide[:, 0].long() * n_lab + guide[:, 1].long()
        centres = torch.arange(d, device=valid.device, dtype=torch.float32)
        close = ((centres[None, :] - guide[:, 2:3].to(valid.device)).abs() <= margin_bins).float()
        near.index_add_(0, row.to(valid.device), close)
    near = (near.reshape(b, n_lab, d) > 0) & valid[:, None, :]
    cited = near.any(-1) & (labels.to(valid.device) == 1)
    return torch.where(cited[..., None], near, valid[:, None, :].expand(b, n_lab, d))


# ----------------------------------------------------------------------------- localisation
def soft_bin_target(target_bin: Tensor, n_bins: int, sigma_bins: float = 2.0, target_end: Tensor | None = None,
                    valid_mask: Tensor | None = None) -> Tensor:
    """[M, n_bins] soft target: Gaussian (sigma in bins) around a fractional bin coordinate (bin b's centre = b),
    or, for rows with target_end > target_bin, a uniform [target_bin, target_end] convolved with the Gaussian
    (Phi((end-b)/s) - Phi((start-b)/s)). Masked to valid bins and normalised; rows with no mass are all zero.
    """
    b = torch.arange(n_bins, device=target_bin.device, dtype=torch.float32)[None]
    start = target_bin.float()[:, None]
    point = torch.exp(-0.5 * ((b - start) / sigma_bins) ** 2)
    if target_end is not None:
        end = target_end.float()[:, None]
        inv = 1.0 / (sigma_bins * math.sqrt(2.0))
        rng = 0.5 * (torch.erf((end - b) * inv) - torch.erf((start - b) * inv))
        q = torch.where(end - start > 1e-3, rng, point)
    else:
        q = point
    if valid_mask is not None:
        q = q * valid_mask.float()
    total = q.sum(-1, keepdim=True)
    return torch.where(total > 1e-12, q / total.clamp_min(1e-12), torch.zeros_like(q))


def localization_loss(bins: Tensor, valid_mask: Tensor | None, snippet_emb: Tensor, target_bin: Tensor,
                      sigma_bins: float = 2.0, tau: float = 0.1, target_end: Tensor | None = None,
                      volume_index: Tensor | None = None, sample_mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between softmax_b(cos(snippet, bin_b)/tau) over the valid bins and a Gaussian soft target.

    bins [B,d,E] (normalised); valid_mask [B,d] bool (bins inside the scan) or None; snippet_emb [M,E];
    target_bin [M] fractional bin coordinate of the cited slice (model slice s -> (s + 0.5)/bin_size - 0.5);
    target_end [M] optional end of a cited range; volume_index [M] row of `bins` per snippet (default arange(M));
    sample_mask [M] bool. Mean over snippets whose target has mass on a valid bin; 0 (with grad) if none.
    """
    if volume_index is None:
        volume_index = torch.arange(snippet_emb.shape[0], device=bins.device)
    logits = torch.einsum("mde,me->md", bins[volume_index], snippet_emb) / tau
    valid = valid_mask[volume_index] if valid_mask is not None else None
    return bin_logit_loss(logits, valid, target_bin, sigma_bins, target_end, sample_mask)


def bin_logit_loss(logits: Tensor, valid: Tensor | None, target_bin: Tensor, sigma_bins: float = 2.0,
                   target_end: Tensor | None = None, sample_mask: Tensor | None = None) -> Tensor:
    """`localization_loss` on given snippet->bin logits [M,d] (e.g. the grounded token scores of
    `ctvl.model.CTVLModel.token_bin_logits`); valid [M,d] bool or None."""
    n_bins = logits.shape[1]
    valid = valid.bool() if valid is not None else torch.ones_like(logits, dtype=torch.bool)
    logits = logits.masked_fill(~valid, float("-inf"))
    q = soft_bin_target(target_bin, n_bins, sigma_bins, target_end, valid)
    row_ok = q.sum(-1) > 0
    if sample_mask is not None:
        row_ok = row_ok & sample_mask.bool()
    logp = torch.log_softmax(logits.masked_fill(~row_ok[:, None] & ~valid, 0.0), dim=-1)
    per = -(q.to(logp.dtype) * torch.where(valid, logp, torch.zeros_like(logp))).sum(-1)
    per = per * row_ok.to(per.dtype)
    return per.sum() / row_ok.sum().clamp_min(1).to(per.dtype)


def slice_to_bin(model_slice: Tensor | float, bin_size: int) -> Tensor | float:
    """Fractional bin coordinate of a model-grid slice (bin b covers slices [b*bin_size, (b+1)*bin_size))."""
    return (model_slice + 0.5) / bin_size - 0.5


# ----------------------------------------------------------------------------- combined
@dataclass
class LossConfig:
    """Which losses are on and their weights (saved with the training config)."""

    siglip: bool = True
    siglip_weight: float = 1.0
    disease: bool = True
    disease_weight: float = 1.0
    mil: bool = True  # token-level (MIL) disease BCE; computed when `tokens` are given
    mil_weight: float = 1.0
    localization: bool = True
    localization_weight: float = 1.0
    sigma_bins: float = 2.0
    tau: float = 0.1


def combined_loss(cfg: LossConfig, *, model=None, img_pooled: Tensor | None = None, report_emb: Tensor | None = None,
                  logit_scale: Tensor | None = None, logit_bias: Tensor | None = None,
                  pos_emb: Tensor | None = None, neg_emb: Tensor | None = None, labels: Tensor | None = None,
                  disease_log_scale: Tensor | float | None = None, disease_bias: Tensor | None = None,
                  tokens: Tensor | None = None, token_mask: Tensor | None = None,
                  mil_log_scale: Tensor | float | None = None, mil_bias: Tensor | None = None,
                  mil_r: float | None = None, mil_n_ref: int | None = None, mil_extra: Tensor | None = None,
                  bins: Tensor | None = None, valid_bins: Tensor | None = None, snippet_emb: Tensor | None = None,
                  target_bin: Tensor | None = None, target_end: Tensor | None = None,
                  volume_index: Tensor | None = None, group=None) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the enabled losses whose inputs are given -> (total, {name: value}).

    With `model` (a CTVLModel or DDP-unwrapped one), logit_scale/bias, the disease scale and the 18-label bias
    default to the model's parameters (disease bias only when pos_emb has one row per ctvl.prompts.LABELS); so do
    the MIL scale / bias (the model's MIL ones with config.mil_disease, else the pooled ones), r and N_ref.
    `mil_extra` [B,L,d,h,w] is added to the token logits (the model's `evidence_logits` with config.blob_readout).
    """
    parts: dict[str, Tensor] = {}
    if model is not None:
        logit_scale = model.logit_scale if logit_scale is None else logit_scale
        logit_bias = model.logit_bias if logit_bias is None else logit_bias
        disease_log_scale = model.disease_logit_scale if disease_log_scale is None else disease_log_scale
        if disease_bias is None and pos_emb is not None and pos_emb.shape[0] == model.disease_bias.shape[0]:
            disease_bias = model.disease_bias
        if tokens is not None:
            mcfg = model.config
            use_mil = bool(getattr(mcfg, "mil_disease", False))
            if mil_log_scale is None:
                mil_log_scale = model.mil_logit_scale if use_mil else model.disease_logit_scale
            if mil_bias is None and pos_emb is not None and pos_emb.shape[0] == model.disease_bias.shape[0]:
                mil_bias = model.mil_bias if use_mil else model.disease_bias
            mil_r = float(getattr(mcfg, "mil_r", 5.0)) if mil_r is None else mil_r
            mil_n_ref = int(math.prod(mcfg.token_grid())) if mil_n_ref is None else mil_n_ref
    if cfg.siglip and img_pooled is not None and report_emb is not None:
        parts["siglip"] = cfg.siglip_weight * siglip_loss(img_pooled, report_emb, logit_scale, logit_bias, group)
    if cfg.disease and img_pooled is not None and pos_emb is not None and labels is not None:
        scale = math.log(10.0) if disease_log_scale is None else disease_log_scale
        parts["disease"] = cfg.disease_weight * disease_prompt_loss(img_pooled, pos_emb, neg_emb, labels, scale,
                                                                    disease_bias)
    if cfg.mil and tokens is not None and pos_emb is not None and labels is not None:
        scale = math.log(10.0) if mil_log_scale is None else mil_log_scale
        parts["mil"] = cfg.mil_weight * mil_disease_loss(tokens, pos_emb, neg_emb, labels, scale, mil_bias,
                                                         5.0 if mil_r is None else mil_r, token_mask, mil_n_ref,
                                                         extra=mil_extra)
    if cfg.localization and bins is not None and snippet_emb is not None and target_bin is not None \
            and snippet_emb.shape[0] > 0:
        parts["localization"] = cfg.localization_weight * localization_loss(
            bins, valid_bins, snippet_emb, target_bin, cfg.sigma_bins, cfg.tau, target_end, volume_index)
    if not parts:
        raise ValueError("combined_loss: no loss enabled with its inputs given")
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
