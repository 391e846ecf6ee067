"""The joint CT vision-language model: image tokens / pooled / depth-bin embeddings and text in one space.

With `config.density_edges_hu` the image side also gets CT densitometry (`ctvl.model.densitometry`): HU-band
fractions per token, per depth bin (in-plane quadrants) and per body region, each projected by a learned head and
added to the tokens, the bin features and the pooled embedding before normalisation.

Scores (all from cosine similarities of L2-normalised embeddings):
- SigLIP image-report logits: t * cos + b, t = exp(logit_scale) (init 10), b = logit_bias (init -10).
- Disease probability (zero-shot, used identically in training and inference), CT-CLIP style: a two-way softmax
  over the prompt similarities [t_d * cos(pooled, pos), t_d * cos(pooled, neg)] taken on the positive class, i.e.
  p = sigmoid(t_d * (cos_pos - cos_neg) + b_label). t_d = exp(disease_logit_scale) (init 10, learnable) and b_label
  (init 0, learnable per CT-RATE label, 0 for free-text labels) calibrate it. cos_pos == cos_neg -> p = 0.5 (before
  bias), and the logit is invariant to any shift shared by both prompts (e.g. generic "chest CT" similarity).
- Token-level (MIL) disease scores (config.mil_disease): per token z_l(x) = t_m * (cos(tok_x, pos_l) -
  cos(tok_x, neg_l)) + b_m,l (own scale t_m = exp(mil_logit_scale), init 10, and bias b_m = mil_bias, init 0) and a
  volume logit by LSE pooling (1/r) log(sum_x exp(r z_l(x)) / N_ref), r = config.mil_r, N_ref = number of tokens
  of the training input (`config.token_grid()`), so a longer scan at inference is not penalised for its extra
  background tokens. `disease_heatmap_logits` is the label heatmap (the z map); trained by
  training.losses.mil_disease_loss. With config.blob_readout, z_l(x) also gets g * w_l . e(x), a learned per-label
  readout of the token's blobness evidence e(x) (ImageEmbeddings.evidence; `evidence_logits`).
- Final disease probability (`disease_probabilities` / `final_disease_logits`): sigmoid of the mean of the pooled
  zero-shot logit and the MIL logit when mil_disease is on (each is BCE-calibrated on its own; the pooled one is
  better for diffuse findings, the MIL one for focal findings), else of the pooled logit.
- Heatmap for free text: cos(token, text) * t per token.
- Depth bins: cos(bin, text) / bin_temperature (RadFinder's cos / 0.1), softmax over the scan's valid bins. With
  config.token_localization the bin's score is the mean of that and the bin's token score, LSE pooling
  (1/r) log mean exp(r cos(token, text)) over its in-plane tokens (r = token_localization_r), also / bin_temperature:
  the text is grounded in the tokens the heatmaps show, and a nodule's bin is not diluted by the in-plane mean.
  With config.locate_label_weight w > 0, a text that names CT-RATE labels (`ctvl.prompts.snippet_labels`) adds
  w * max_l max_(h,w) z_l(x) per bin (`label_depth_evidence`): where its findings' heatmaps peak, the text's
  qualifiers (side, lobe) picking among them; a product of experts over the bins, w fitted on a validation split.
- Local label heatmaps (config.mil_local, dense head): `disease_heatmap_logits`, the MIL logit and its loss take
  `label_tokens(emb)` = ImageEmbeddings.local, a projection of conv3x3x3(dense stem stage) (+ the token
  densitometry) with no transformer term, instead of the dense tokens.
- Dense head (config.dense_head, hybrid): tokens = trilinear upsampling of the projected transformer tokens to the
  stem stage `dense_stage` grid + a linear projection of DenseHead's mixed (lateral + top-down) features; the pooled
  embedding is attention pooling over these dense tokens (a convex combination of exactly the tokens the heatmaps
  show, so the global objectives also train them) with attention scores computed on the transformer tokens and
  trilinearly upsampled (keys on 19k dense tokens cost ~20% of a step); bins = in-plane mean of the upsampled
  transformer features + a projection of the in-plane mean of the dense features -> depth combiner -> bin head (one
  bin per dense depth).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from ctvl.model.blobness import token_blob_features
from ctvl.model.config import ModelConfig
from ctvl.model.densitometry import (
    DensityBands,
    RunningStandardize,
    bin_fractions,
    log_fractions,
    regional_fractions,
)
from ctvl.model.stitch import stitched
from ctvl.model.text import TextTower, chunk_text, split_sentences
from ctvl.model.vision import DenseHead, VisionEncoder, _groups, _init_weights
from ctvl.prompts import LABELS, disease_prompts, prompt_table
from torch import Tensor, nn

EVIDENCE_GAIN = 4.0  # see CTVLModel.evidence_logits


class ImageEmbeddings(NamedTuple):
    """tokens [B,d,h,w,E] projected (not normalised), pooled [B,E] and bins [B,d,E] L2-normalised; with
    `config.mil_local` also local [B,d,h,w,E], the tokens of the label heatmaps (see `CTVLModel.label_tokens`); with
    `config.blob_readout` also evidence [B,d,h,w,S], the compressed blobness maximum of each label token, which the
    per-label readout weighs (`CTVLModel.evidence_logits`)."""

    tokens: Tensor
    pooled: Tensor
    bins: Tensor
    local: Tensor | None = None
    evidence: Tensor | None = None


class CTVLOutput(NamedTuple):
    """What `CTVLModel.forward` returns (use forward under DDP): any part not asked for is None."""

    image: ImageEmbeddings | None
    text: Tensor | None
    report: Tensor | None


def label_rows(param: Tensor, labels: list[str] | tuple[str, ...]) -> Tensor:
    """Rows of a per-CT-RATE-label parameter [len(LABELS), ...] for `labels`; zeros for any other label (free text)."""
    idx = {name: i for i, name in enumerate(LABELS)}
    zero = param.new_zeros(param.shape[1:])
    return torch.stack([param[idx[lab]] if lab in idx else zero for lab in labels])


def readout_start(config: ModelConfig) -> Tensor:
    """[L,S] start of the blobness readout weights: `blob_readout_init` for `blob_readout_labels` (all when empty),
    0 for the other CT-RATE labels."""
    chosen = set(config.blob_readout_labels or LABELS)
    rows = [float(config.blob_readout_init) if name in chosen else 0.0 for name in LABELS]
    return torch.tensor(rows)[:, None].repeat(1, len(config.input_blob_scales_mm))


def label_depth_evidence(heat: Tensor, columns: Tensor | None = None) -> Tensor:
    """Label heatmap logits [..., L, d, h, w] -> [..., d]: per depth bin, the strongest token of the strongest
    label (the depth profile of where a text's named findings are); `columns` [w] bool: among those columns only
    (the side a text names, `ctvl.model.laterality`)."""
    if columns is not None:
        heat = heat[..., columns]
    return heat.amax(dim=(-2, -1)).amax(dim=-2)


def mlp_head(din: int, hidden: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(din), nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, dout))


def group_means(emb: Tensor, sizes: list[int]) -> Tensor:
    """Renormalised mean of consecutive row groups: emb [sum(sizes), E] -> [len(sizes), E] (prompt templates)."""
    means, i = [], 0
    for n in sizes:
        means.append(F.normalize(emb[i:i + n].mean(0), dim=-1))
        i += n
    return torch.stack(means)


def disease_logits(pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor, log_scale: Tensor | float,
                   bias: Tensor | None = None) -> Tensor:
    """[B,L] logits t*(cos(pooled,pos) - cos(pooled,neg)) + bias; inputs are L2-normalised [B,E], [L,E], [L,E]."""
    scale = log_scale.exp() if isinstance(log_scale, Tensor) else math.exp(log_scale)
    logits = scale * (pooled @ pos_emb.t() - pooled @ neg_emb.t())
    if bias is not None:
        logits = logits + bias
    return logits


def token_disease_logits(tokens: Tensor, pos_emb: Tensor, neg_emb: Tensor, log_scale: Tensor | float,
                         bias: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """Per-token logits t*(cos(tok,pos) - cos(tok,neg)) + bias (+ extra [B,L,...], e.g. the blobness readout):
    tokens [B,...,E] (any norm) -> [B,L,...]."""
    b, e = tokens.shape[0], tokens.shape[-1]
    spatial = tokens.shape[1:-1]
    t = tokens.reshape(b, -1, e)
    # cos = (t . d) / |t|: divide the small [B,L,N] product, not the [B,N,E] tokens (F.normalize on ~10^4 tokens
    # per volume cost ~15% of a CPU training step, mostly in its backward)
    norm = torch.linalg.vector_norm(t, dim=-1).clamp_min(1e-12)  # F.normalize's eps
    scale = log_scale.exp() if isinstance(log_scale, Tensor) else math.exp(log_scale)
    z = scale * torch.einsum("bne,le->bln", t, pos_emb - neg_emb) / norm[:, None, :]
    if bias is not None:
        z = z + bias[None, :, None]
    if extra is not None:
        z = z + extra.reshape(b, z.shape[1], -1).to(z.dtype)
    return z.reshape(b, -1, *spatial)


def lse_pool(z: Tensor, r: float, mask: Tensor | None = None, n_ref: int | None = None) -> Tensor:
    """Smooth max (1/r) log(sum_n exp(r z_n) / N) over the last dim of z [..., N]; masked-out entries are dropped.

    N = n_ref if given, else the number of (valid) entries (LSE-pooling, 'log mean exp'); mask broadcasts to z.
    """
    rz = r * z
    if mask is not None:
        rz = rz.masked_fill(~mask.bool(), float("-inf"))
        count = mask.bool().expand_as(z).sum(-1).clamp_min(1).to(z.dtype)
    else:
        count = torch.full(z.shape[:-1], float(z.shape[-1]), dtype=z.dtype, device=z.device)
    if n_ref is not None:
        count = torch.full_like(count, float(n_ref))
    out = (torch.logsumexp(rz, dim=-1) - torch.log(count)) / r
    if mask is not None:  # no valid entry -> 0 instead of -inf
        out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
    return out


def mil_disease_logits(tokens: Tensor, pos_emb: Tensor, neg_emb: Tensor, log_scale: Tensor | float,
                       bias: Tensor | None = None, r: float = 5.0, mask: Tensor | None = None,
                       n_ref: int | None = None, extra: Tensor | None = None) -> Tensor:
    """[B,L] volume logits: LSE pooling (see `lse_pool`) of `token_disease_logits` (+ `extra`) over all tokens.

    tokens [B,d,h,w,E] (or [B,N,E]); mask [B,d,h,w] / [B,N] bool (valid tokens) or [B,d] (valid depth bins), or
    per label [B,L,d] (depth bins pooled for each label, e.g. report-guided MIL in training).
    """
    z = token_disease_logits(tokens, pos_emb, neg_emb, log_scale, bias, extra)  # [B,L,...]
    b, n_lab = z.shape[:2]
    flat = z.reshape(b, n_lab, -1)
    m = None
    if mask is not None:
        mask = mask.bool()
        if mask.ndim == 3 and tokens.ndim == 5 and mask.shape[1] == n_lab and mask.shape[2] == tokens.shape[1]:
            m = mask[..., None, None].expand(b, n_lab, *tokens.shape[1:4]).reshape(b, n_lab, -1)
            return lse_pool(flat, r, m, n_ref)
        if mask.ndim == 2 and tokens.ndim == 5:  # depth-bin mask -> token mask
            mask = mask[:, :, None, None].expand(tokens.shape[:4])
        m = mask.reshape(b, 1, -1)
    return lse_pool(flat, r, m, n_ref)


def token_bin_similarity(tokens: Tensor, text: Tensor, r: float, owner: Tensor | None = None) -> Tensor:
    """Per depth bin, (1/r) log mean_x exp(r cos(token_x, text)) over the bin's in-plane tokens.

    tokens [B,d,h,w,E] (any norm); text [T,E] (any norm). Without `owner`: every text against every volume ->
    [B,T,d]. With owner [T] (the volume of each text, as in training's snippet pairs) -> [T,d], computed per volume
    (never materialising a [T,d,h,w,E] copy of the tokens).
    """
    b, d = tokens.shape[:2]
    flat = tokens.reshape(b, d, -1, tokens.shape[-1])  # [B,d,n,E]
    norm = torch.linalg.vector_norm(flat, dim=-1).clamp_min(1e-12)  # [B,d,n]
    q = F.normalize(text, dim=-1)

    def pooled(cos: Tensor) -> Tensor:  # [..., n] -> [...]
        return (torch.logsumexp(r * cos, dim=-1) - math.log(cos.shape[-1])) / r

    if owner is None:
        return pooled(torch.einsum("bdne,te->btdn", flat, q) / norm[:, None])
    # unbind, not flat[v]: indexing's backward would allocate a full-size gradient per volume (measured 1.5 s/step)
    vols, norms = flat.unbind(0), norm.unbind(0)
    rows = [(owner == v).nonzero(as_tuple=True)[0] for v in range(b)]
    parts = [pooled(torch.einsum("dne,te->tdn", vols[v], q[r]) / norms[v][None]) for v, r in enumerate(rows) if len(r)]
    order = torch.cat([r for r in rows if len(r)])
    return torch.cat(parts)[torch.argsort(order)]


class AttentionPool(nn.Module):
    """Weights from a learnable query against LayerNorm'd keys, one weight map per head; values are given.

    Pooled = per-head weighted mean of the value vectors, so the pooled embedding is a convex combination of
    the (projected) tokens and token-text similarities explain the image-text score (heatmaps).
    """

    def __init__(self, key_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(key_dim)
        self.key = nn.Linear(key_dim, key_dim)
        self.query = nn.Parameter(torch.zeros(num_heads, key_dim // num_heads))
        nn.init.trunc_normal_(self.query, std=0.02)

    def scores(self, keys: Tensor) -> Tensor:
        """keys [B,N,K] -> attention scores [B,heads,N] (before the softmax)."""
        b, n, k = keys.shape
        kk = self.key(self.norm(keys)).reshape(b, n, self.num_heads, k // self.num_heads)
        return torch.einsum("bnhc,hc->bhn", kk, self.query) / math.sqrt(k // self.num_heads)

    def weights(self, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        """keys [B,N,K] -> weights [B,heads,N] (softmax over N; masked positions get 0)."""
        scores = self.scores(keys)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return scores.softmax(-1)

    def forward(self, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.combine(self.weights(keys, mask), values)

    def combine(self, w: Tensor, values: Tensor) -> Tensor:
        """Per-head weighted mean: weights [B,heads,N], values [B,N,E] -> [B,E]."""
        b, n, e = values.shape
        if e % self.num_heads == 0:
            v = values.reshape(b, n, self.num_heads, e // self.num_heads)
            return torch.einsum("bhn,bnhc->bhc", w, v).reshape(b, e)
        return torch.einsum("bn,bne->be", w.mean(1), values)


class DepthBinCombiner(nn.Module):
    """In-plane mean of the encoder tokens [B,d,C] -> residual 1D conv over depth -> [B,d,C]."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x).transpose(1, 2)
        y = self.conv2(F.gelu(self.conv1(y)))
        return x + y.transpose(1, 2)


class CTVLModel(nn.Module):
    """Vision encoder + text tower + projections into a shared space of `config.shared_dim`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, e = config.embed_dim, config.shared_dim
        self.vision = VisionEncoder(config)
        self.token_head = mlp_head(c, config.proj_hidden, e)
        self.dense: DenseHead | None = None
        if config.uses_dense_head():
            skip_ch = int(config.stem_channels[config.dense_stage_index()])
            self.dense = DenseHead(c, skip_ch, config.dense_dim)
            self.dense.apply(_init_weights)
            self.dense_token = nn.Linear(config.dense_dim, e)  # dense features -> shared space (added to tokens)
            self.dense_bin = nn.Linear(config.dense_dim, c)  # in-plane mean of dense features -> bin features
        self.local: nn.Module | None = None
        if config.mil_local:  # dense stem stage alone -> label-heatmap tokens
            dd = config.dense_dim
            self.local = nn.Sequential(nn.Conv3d(skip_ch, dd, kernel_size=3, padding=1, bias=False),
                                       nn.GroupNorm(_groups(dd), dd), nn.GELU())
            self.local.apply(_init_weights)
            self.local_token = nn.Linear(dd, e)
        self.density: DensityBands | None = None
        if config.density_edges_hu:  # CT densitometry features -> tokens, depth bins and the pooled embedding
            self.density = DensityBands(config.density_edges_hu, config.hu_window)
            k = self.density.n_bands
            kt = k + (len(config.input_blob_scales_mm) if config.blob_tokens else 0)  # + blobness per token
            self.density_token = mlp_head(kt, config.proj_hidden // 2, e)
            self.density_bin = nn.Linear(4 * k, c)
            self.density_pooled = mlp_head(k * math.prod(config.density_regions), config.proj_hidden, e)
            self.density_scalers: nn.ModuleDict | None = None
            if config.density_norm:
                self.density_scalers = nn.ModuleDict({
                    "token": RunningStandardize(kt), "bin": RunningStandardize(4 * k),
                    "pooled": RunningStandardize(k * math.prod(config.density_regions))})
        self.label_adapters = nn.Parameter(torch.zeros(len(LABELS), 2, e)) if config.label_adapters else None
        # per-label weights on the label tokens' blobness evidence, added to their token-level disease logits
        self.evidence_weights = (nn.Parameter(readout_start(config)) if config.blob_readout else None)
        self.pool = AttentionPool(c, config.num_heads) if config.pooling in ("attention", "max+attention") else None
        # "max+attention": pooled = W [max_x tok(x); attention-pooled] (the max carries focal findings)
        self.pool_mix = nn.Linear(2 * e, e) if config.pooling == "max+attention" else None
        self.cnn_branch: nn.Module | None = None
        if config.pooling == "cnn":
            cs = int(config.stem_channels[-1])
            self.cnn_branch = nn.Sequential(
                nn.Conv3d(cs, 2 * cs, kernel_size=3, stride=2, padding=1, bias=False), nn.GroupNorm(8, 2 * cs),
                nn.GELU())
            self.cnn_branch.apply(_init_weights)
            self.cnn_head = mlp_head(4 * cs, config.proj_hidden, e)
        self.bin_combiner = DepthBinCombiner(c, config.bin_kernel)
        self.bin_head = mlp_head(c, config.proj_hidden, e)
        self.text = TextTower(config)
        self.text_head = mlp_head(self.text.width, config.proj_hidden, e)
        self.sentence_pool = AttentionPool(e, 1) if config.report_pooling == "attention" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.disease_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.disease_bias = nn.Parameter(torch.zeros(len(LABELS)))
        if config.mil_disease:
            self.mil_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.mil_bias = nn.Parameter(torch.zeros(len(LABELS)))
        self.prompts: dict[str, dict[str, list[str]]] = prompt_table(LABELS)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def bin_size(self) -> int:
        """Model slices per depth bin (bin b covers model slices [b*bin_size, (b+1)*bin_size))."""
        return self.config.downsample()[0]

    def saved_state_keys(self) -> list[str]:
        """State-dict keys that `save_weights` writes (everything but the frozen text backbone)."""
        return [k for k in self.state_dict() if not k.startswith("text.backbone.")] + self.text.trainable_state_keys(
            "text.")

    # ------------------------------------------------------------------ image
    def encode_image(self, x: Tensor) -> ImageEmbeddings:
        """x [B,1,D,H,W] (windowed to [0,1], model grid; [B,1+S,...] with S precomputed blobness channels, see
        `VisionEncoder`) -> ImageEmbeddings on the `config.token_grid()` grid."""
        stem = None
        x = self.vision.with_blobs(x)  # computed once, for the stem and the token features
        if self.cnn_branch is not None:
            feats, skip, stem = self.vision.forward_features(x)
        elif self.dense is not None:
            feats, skip = self.vision(x, return_skip=True)
        else:
            feats, skip = self.vision(x), None  # [B,d,h,w,C]
        b, d, h, w, c = feats.shape
        flat = feats.reshape(b, d * h * w, c)
        tokens = self.token_head(flat)  # [B,N,E]
        if self.dense is None:
            dens = self._densitometry(x, (d, h, w))
            if dens is not None:
                tokens = tokens + dens[0].reshape(b, d * h * w, -1)
            if self.cnn_branch is not None:
                pooled = self._global_branch(tokens, stem)
            else:
                pooled = self.pool(flat, tokens) if self.pool is not None else tokens.mean(1)
                if self.pool_mix is not None:
                    pooled = self.pool_mix(torch.cat([self._global_branch(tokens, stem), pooled], dim=-1))
            bin_feats = feats.mean(dim=(2, 3))
            if dens is not None:
                pooled, bin_feats = pooled + dens[2], bin_feats + dens[1]
            bins = self.bin_head(self.bin_combiner(bin_feats))  # [B,d,E]
            return ImageEmbeddings(tokens.reshape(b, d, h, w, -1), F.normalize(pooled, dim=-1),
                                   F.normalize(bins, dim=-1), None, self._evidence(x, (d, h, w)))
        mixed = self.dense(feats, skip).contiguous(memory_format=torch.channels_last_3d)  # [B,Cd,D',H',W']
        fine = tuple(mixed.shape[2:])
        # channels-last all the way: the permuted views below are contiguous [B,D',H',W',E] (no copies)
        up = F.interpolate(tokens.reshape(b, d, h, w, -1).permute(0, 4, 1, 2, 3), size=fine, mode="trilinear",
                           align_corners=False)
        dense = up.permute(0, 2, 3, 4, 1) + self.dense_token(mixed.permute(0, 2, 3, 4, 1))  # [B,D',H',W',E]
        dens = self._densitometry(x, fine)
        if dens is not None:
            dense = dense + dens[0]
        dflat = dense.reshape(b, -1, dense.shape[-1])
        if self.cnn_branch is not None:  # the CNN branch alone: attention-pooling dense tokens anchored it (measured)
            pooled = self._global_branch(dflat, stem)
        elif self.pool is not None:  # scores from the transformer features, trilinearly upsampled (cheap)
            sc = self.pool.scores(flat).reshape(b, -1, d, h, w)
            sc = F.interpolate(sc, size=fine, mode="trilinear", align_corners=False).reshape(b, sc.shape[1], -1)
            pooled = self.pool.combine(sc.softmax(-1), dflat)
        else:
            pooled = dflat.mean(1)
        if self.pool_mix is not None and self.cnn_branch is None:
            pooled = self.pool_mix(torch.cat([self._global_branch(dflat, stem), pooled], dim=-1))
        coarse = F.interpolate(feats.mean(dim=(2, 3)).transpose(1, 2), size=fine[0], mode="linear",
                               align_corners=False).transpose(1, 2)  # = in-plane mean of the upsampled features
        bin_feats = coarse + self.dense_bin(mixed.mean(dim=(3, 4)).transpose(1, 2))
        if dens is not None:
            pooled, bin_feats = pooled + dens[2], bin_feats + dens[1]
        bins = self.bin_head(self.bin_combiner(bin_feats))
        local = None
        if self.local is not None:
            local = self.local_token(self.local(skip).permute(0, 2, 3, 4, 1))  # [B,D',H',W',E]
            if dens is not None:
                local = local + dens[0]
        return ImageEmbeddings(dense, F.normalize(pooled, dim=-1), F.normalize(bins, dim=-1), local,
                               self._evidence(x, fine))

    def _evidence(self, x: Tensor, grid: tuple[int, ...]) -> Tensor | None:
        """[B,d,h,w,S] compressed blobness maximum per label token with `config.blob_readout`, else None."""
        if self.evidence_weights is None:
            return None
        return token_blob_features(x[:, 1:], self.config.downsample(), tuple(grid)).permute(0, 2, 3, 4, 1)

    def evidence_logits(self, evidence: Tensor | None, labels: list[str] | tuple[str, ...] | None,
                        n_rows: int | None = None) -> Tensor | None:
        """[B,L,d,h,w]: the per-label readout g * sum_s w_{l,s} e_s(x) of the evidence [B,d,h,w,S] (0 for labels
        outside the CT-RATE set, e.g. free text), added to the token-level disease logits; None without it. `labels`
        None means all CT-RATE labels (when `n_rows` is None or equals their count). g = EVIDENCE_GAIN: Adam moves a
        weight by ~lr per step, and the gain is meant to let w (init 0) reach the logits' range (~ +-4 for evidence
        ~0-2.5) within the demo's budget; in the one demo-recipe run, under weight decay, the weights stayed near 0
        (README)."""
        if evidence is None or self.evidence_weights is None:
            return None
        if labels is None:
            if n_rows not in (None, len(LABELS)):
                return None
            labels = LABELS
        w = label_rows(self.evidence_weights, labels)  # [L,S]
        return EVIDENCE_GAIN * torch.einsum("bdhws,ls->bldhw", evidence.to(w.dtype), w)

    @staticmethod
    def label_tokens(image: ImageEmbeddings) -> Tensor:
        """The tokens of the label heatmaps and the MIL logit: `image.local` with config.mil_local, else the
        dense/transformer tokens."""
        return image.local if image.local is not None else image.tokens

    def _densitometry(self, x: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor] | None:
        """HU-band fractions on the token grid -> (token embeddings [B,d,h,w,E], bin features [B,d,C], pooled
        embedding [B,E]), or None without `config.density_edges_hu`. With `config.blob_tokens` the token features
        also hold the blobness channels of x [B,1+S,...] (`ctvl.model.blobness.token_blob_features`)."""
        if self.density is None:
            return None
        frac = self.density.pool(x[:, :1], self.config.downsample())  # [B,K,d,h,w] of the image channel
        if tuple(frac.shape[2:]) != tuple(grid):
            frac = F.adaptive_avg_pool3d(frac, tuple(grid))
        frac = frac.to(self.logit_scale.dtype)
        token = log_fractions(frac)
        if self.config.blob_tokens:
            token = torch.cat([token, token_blob_features(x[:, 1:], self.config.downsample(), grid).to(token.dtype)], 1)
        feats = {"token": token.permute(0, 2, 3, 4, 1), "bin": log_fractions(bin_fractions(frac)),
                 "pooled": log_fractions(regional_fractions(frac, self.config.density_regions))}
        if self.density_scalers is not None:
            feats = {name: self.density_scalers[name](f) for name, f in feats.items()}
        return self.density_token(feats["token"]), self.density_bin(feats["bin"]), self.density_pooled(feats["pooled"])

    def _global_branch(self, tokens: Tensor, stem: Tensor | None) -> Tensor:
        """[B,E]: the CNN branch (global max and mean of one more conv stage on the stem) or the token-wise max."""
        if self.cnn_branch is None or stem is None:
            return tokens.amax(1)
        f = self.cnn_branch(stem)
        return self.cnn_head(torch.cat([f.amax(dim=(2, 3, 4)), f.mean(dim=(2, 3, 4))], dim=-1))

    # ------------------------------------------------------------------ text
    def _encode_units(self, units: list[list[str]]) -> Tensor:
        flat = [s for u in units for s in u]
        feats = self.text(flat, device=self.device).to(self.logit_scale.dtype)
        proj = self.text_head(feats)  # [S,E]
        out = []
        i = 0
        for u in units:
            p = proj[i:i + len(u)]
            i += len(u)
            if len(u) == 1:
                out.append(p[0])
            elif self.sentence_pool is not None:
                out.append(self.sentence_pool(p[None], p[None])[0])
            else:
                out.append(p.mean(0))
        return F.normalize(torch.stack(out), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """Short texts (prompts, queries, snippets), each one sentence -> [N,E] L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        return self._encode_units([chunk_text(t) for t in texts])

    def encode_reports(self, reports: list[str]) -> Tensor:
        """Long reports (Findings + Impressions): split into sentences, project each, pool -> [N,E] normalised."""
        if isinstance(reports, str):
            reports = [reports]
        return self._encode_units([split_sentences(r) for r in reports])

    def forward(self, images: Tensor | None = None, texts: list[str] | None = None,
                reports: list[str] | None = None) -> CTVLOutput:
        """One call for training under DDP: any of images [B,1,D,H,W], short texts, reports."""
        return CTVLOutput(
            self.encode_image(images) if images is not None else None,
            self.encode_text(texts) if texts else None,
            self.encode_reports(reports) if reports else None,
        )

    # ------------------------------------------------------------------ scores
    def prompt_embeddings(self, labels: list[str] | tuple[str, ...] | None = None) -> tuple[Tensor, Tensor]:
        """Per label: mean of its positive / negative template embeddings, renormalised -> ([L,E], [L,E])."""
        labels = list(labels or LABELS)
        groups: list[list[str]] = []
        for label in labels:
            entry = self.prompts.get(label)
            pos, neg = (entry["positive"], entry["negative"]) if entry else disease_prompts(label)
            groups += [pos, neg]
        emb = self.encode_text([t for g in groups for t in g])
        stacked = group_means(emb, [len(g) for g in groups]).reshape(len(labels), 2, -1)
        return self.adapt_prompt_embeddings(labels, stacked[:, 0], stacked[:, 1])

    def adapt_prompt_embeddings(self, labels: list[str] | tuple[str, ...], pos: Tensor,
                                neg: Tensor) -> tuple[Tensor, Tensor]:
        """Add the learned per-label residuals (config.label_adapters) to the CT-RATE labels' mean prompt embeddings
        and renormalise; other labels (free text) pass unchanged. Every prompt-embedding path must call this."""
        if self.label_adapters is None:
            return pos, neg
        idx = {name: i for i, name in enumerate(LABELS)}
        rows = [i for i, lab in enumerate(labels) if lab in idx]
        if not rows:
            return pos, neg
        delta = self.label_adapters[[idx[labels[i]] for i in rows]].to(pos.dtype)  # [R,2,E]
        pos, neg = pos.clone(), neg.clone()
        pos[rows] = F.normalize(pos[rows] + delta[:, 0], dim=-1)
        neg[rows] = F.normalize(neg[rows] + delta[:, 1], dim=-1)
        return pos, neg

    def label_bias(self, labels: list[str] | tuple[str, ...] | None = None, mil: bool = False) -> Tensor:
        """Per-label calibration bias [L] (learned for the CT-RATE labels, 0 for others); `mil`: the MIL bias."""
        labels = list(labels or LABELS)
        return label_rows(self.mil_bias if mil and self.config.mil_disease else self.disease_bias, labels)

    def _mil_params(self, n_rows: int, labels) -> tuple[Tensor, Tensor | None]:
        if labels is None and n_rows == len(LABELS):
            labels = LABELS
        scale = self.mil_logit_scale if self.config.mil_disease else self.disease_logit_scale
        return scale, (self.label_bias(labels, mil=True) if labels is not None else None)

    def disease_heatmap_logits(self, tokens: Tensor, labels: list[str] | tuple[str, ...] | None = None,
                               pos_emb: Tensor | None = None, neg_emb: Tensor | None = None,
                               evidence: Tensor | None = None) -> Tensor:
        """Label heatmaps: token-level disease logits z_l(x) [B,L,d,h,w] (see module docstring).

        tokens [B,d,h,w,E] from encode_image; prompt embeddings are computed from `labels` unless pos/neg [L,E]
        are given (then `labels` only names their rows for the bias). Without mil_disease the pooled zero-shot
        scale and bias are used per token. `evidence` (ImageEmbeddings.evidence) adds the blobness readout.
        """
        if pos_emb is None or neg_emb is None:
            labels = list(labels or LABELS)
            pos_emb, neg_emb = self.prompt_embeddings(labels)
        scale, bias = self._mil_params(pos_emb.shape[0], labels)
        extra = self.evidence_logits(evidence, labels, pos_emb.shape[0])
        return token_disease_logits(tokens, pos_emb, neg_emb, scale, bias, extra)

    def stitched_heatmap_logits(self, x: Tensor, labels: list[str] | tuple[str, ...], pos_emb: Tensor,
                                neg_emb: Tensor, subdivision: tuple[int, int, int] | None = None) -> Tensor:
        """`disease_heatmap_logits` of input x [B,C,D,H,W] on the grid `config.heatmap_subdivision` (or
        `subdivision`) times finer than the tokens, by shift-and-stitch (`ctvl.model.stitch`) ->
        [B,L,d*n_d,h*n_h,w*n_w]; its geometry: `ctvl.model.stitch.stitched_ijk_to_ras`."""

        def maps(moved: Tensor) -> Tensor:
            emb = self.encode_image(moved)
            return self.disease_heatmap_logits(self.label_tokens(emb), labels, pos_emb, neg_emb, emb.evidence)

        n = tuple(subdivision or self.config.heatmap_subdivision)
        return stitched(maps, x, self.config.downsample(), n)  # type: ignore[arg-type]

    def mil_logits(self, tokens: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                   labels: list[str] | tuple[str, ...] | None = None, mask: Tensor | None = None,
                   evidence: Tensor | None = None) -> Tensor:
        """[B,L] volume logits: LSE pooling of `disease_heatmap_logits` (r = config.mil_r, N_ref = training grid)."""
        scale, bias = self._mil_params(pos_emb.shape[0], labels)
        n_ref = int(math.prod(self.config.token_grid()))
        extra = self.evidence_logits(evidence, labels, pos_emb.shape[0])
        return mil_disease_logits(tokens, pos_emb, neg_emb, scale, bias, self.config.mil_r, mask, n_ref, extra)

    def final_disease_logits(self, pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                             labels: list[str] | tuple[str, ...] | None = None,
                             tokens: Tensor | None = None, mask: Tensor | None = None,
                             evidence: Tensor | None = None) -> Tensor:
        """[B,L]: mean of the pooled zero-shot and MIL logits when mil_disease is on and tokens are given, else the
        pooled zero-shot logit. `mask` [B,d] (or [B,d,h,w]) marks the tokens inside the scan, as in training;
        `evidence` (ImageEmbeddings.evidence) adds the blobness readout to the MIL logit."""
        logits = self.disease_logits(pooled, pos_emb, neg_emb, labels)
        if tokens is not None and self.config.mil_disease:
            logits = 0.5 * (logits + self.mil_logits(tokens, pos_emb, neg_emb, labels, mask=mask, evidence=evidence))
        return logits

    def disease_logits(self, pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                       labels: list[str] | tuple[str, ...] | None = None) -> Tensor:
        """[B,L] zero-shot logits (see module docstring); `labels` names the rows of pos/neg for the bias."""
        if labels is None and pos_emb.shape[0] == len(LABELS):
            labels = LABELS
        bias = self.label_bias(labels) if labels is not None else None
        return disease_logits(pooled, pos_emb, neg_emb, self.disease_logit_scale, bias)

    @torch.no_grad()
    def disease_probabilities(self, pooled: Tensor, labels: list[str] | tuple[str, ...] | None = None,
                              tokens: Tensor | None = None, pos_emb: Tensor | None = None,
                              neg_emb: Tensor | None = None, evidence: Tensor | None = None) -> Tensor:
        """[B,L] probabilities = sigmoid(final_disease_logits): with mil_disease and `tokens` [B,d,h,w,E] given,
        sigmoid of the mean of the pooled zero-shot logit and the token-level MIL logit; else the pooled one.
        Prompt embeddings are computed from `labels` unless pos_emb/neg_emb [L,E] are given."""
        labels = list(labels or LABELS)
        if pos_emb is None or neg_emb is None:
            pos_emb, neg_emb = self.prompt_embeddings(labels)
        return torch.sigmoid(self.final_disease_logits(pooled, pos_emb, neg_emb, labels, tokens, evidence=evidence))

    def siglip_logits(self, img: Tensor, txt: Tensor) -> Tensor:
        return img @ txt.t() * self.logit_scale.exp() + self.logit_bias

    def heatmap_logits(self, tokens: Tensor, text_emb: Tensor) -> Tensor:
        """cos(token, text) * t: text [E] -> [B,d,h,w]; text [T,E] -> [B,T,d,h,w]."""
        t = F.normalize(tokens, dim=-1)
        q = F.normalize(text_emb, dim=-1)
        scale = self.logit_scale.exp()
        if q.ndim == 1:
            return torch.einsum("bdhwe,e->bdhw", t, q) * scale
        return torch.einsum("bdhwe,te->btdhw", t, q) * scale

    def bin_logits(self, bins: Tensor, text_emb: Tensor, tokens: Tensor | None = None) -> Tensor:
        """cos(bin, text) / bin_temperature: text [E] -> [B,d]; text [T,E] -> [B,T,d]. With
        config.token_localization and the tokens [B,d,h,w,E] given, the mean of that and the bins' token scores
        (`token_bin_logits`)."""
        b = F.normalize(bins, dim=-1)
        q = F.normalize(text_emb, dim=-1)
        logits = torch.einsum("bde,te->btd", b, q.reshape(-1, q.shape[-1])) / self.config.bin_temperature
        if tokens is not None and self.config.token_localization:
            logits = 0.5 * (logits + self.token_bin_logits(tokens, q.reshape(-1, q.shape[-1])))
        return logits[:, 0] if q.ndim == 1 else logits

    def pair_bin_logits(self, image: ImageEmbeddings, text_emb: Tensor, owner: Tensor,
                        text_labels: list[tuple[str, ...]] | None = None,
                        prompts: tuple[Tensor, Tensor] | None = None,
                        columns: list[Tensor | None] | None = None) -> Tensor:
        """[T,d] `bin_logits` of each text [T,E] against its own volume of `image` (owner [T] = its row); with
        `text_labels` (per text, the CT-RATE labels it names) also `label_bin_logits` (prompts: its pos/neg;
        columns: `side_columns`)."""
        q = F.normalize(text_emb, dim=-1)
        logits = torch.einsum("tde,te->td", F.normalize(image.bins[owner], dim=-1), q) / self.config.bin_temperature
        if self.config.token_localization:
            logits = 0.5 * (logits + self.token_bin_logits(image.tokens, q, owner))
        if text_labels is not None:
            extra = self.label_bin_logits(image, text_labels, owner, *(prompts or (None, None)), columns=columns)
            if extra is not None:
                logits = logits + extra.to(logits.dtype)
        return logits

    def label_bin_logits(self, image: ImageEmbeddings, text_labels: list[tuple[str, ...]], owner: Tensor,
                         pos_emb: Tensor | None = None, neg_emb: Tensor | None = None,
                         weight: float | None = None, columns: list[Tensor | None] | None = None) -> Tensor | None:
        """[T,d] w * `label_depth_evidence` of each text's named labels in its own volume (owner [T]); 0 for a text
        that names none; None when w is 0 or no text names a label. w = `weight`, default
        config.locate_label_weight. pos/neg [L,E]: the prompt embeddings of all CT-RATE labels (computed when not
        given). columns: per text, the token columns [w] to take the peaks from (`side_columns`: the side the text
        names) or None for all."""
        w = float(self.config.locate_label_weight if weight is None else weight)
        if w == 0.0 or not any(text_labels):
            return None
        if pos_emb is None or neg_emb is None:
            pos_emb, neg_emb = self.prompt_embeddings(LABELS)
        heat = self.disease_heatmap_logits(self.label_tokens(image), LABELS, pos_emb, neg_emb, image.evidence)
        out = torch.zeros(len(text_labels), heat.shape[2], dtype=heat.dtype, device=heat.device)
        for t, names in enumerate(text_labels):
            rows = [LABELS.index(n) for n in names if n in LABELS]
            if rows:
                out[t] = w * label_depth_evidence(heat[int(owner[t]), rows], columns[t] if columns else None)
        return out

    def side_columns(self, texts: list[str], images: Tensor, owner: Tensor) -> list[Tensor | None] | None:
        """Per text, the token columns on the patient side it names (`ctvl.model.laterality.side_columns`) with
        config.locate_laterality, else None. images: the model input [B,C,D,H,W]; owner [T]: each text's row."""
        if not self.config.locate_laterality:
            return None
        from ctvl.model.laterality import side_columns
        from ctvl.prompts import snippet_side

        pw = int(self.config.downsample()[2])
        return [side_columns(images[int(o), 0], snippet_side(t), pw, self.config.hu_window)
                for t, o in zip(texts, owner)]

    def token_bin_logits(self, tokens: Tensor, text_emb: Tensor, owner: Tensor | None = None) -> Tensor:
        """Grounded bin scores `token_bin_similarity` / bin_temperature: [B,T,d], or [T,d] with `owner`."""
        sim = token_bin_similarity(tokens, text_emb, self.config.token_localization_r, owner)
        return sim / self.config.bin_temperature
