"""3D vision encoders: a ViT (patch embedding) and a CNN-ViT hybrid (3D conv stem), both -> token grid.

Both return encoder features [B, d, h, w, C]; the joint model projects them into the shared space.
Attention is `torch.nn.functional.scaled_dot_product_attention` (fused kernels on CPU and GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ctvl.model.blobness import HessianBlobness, compress
from ctvl.model.config import ModelConfig
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, device=None, dtype=None) -> Tensor:
    """Fixed 3D sine-cosine position embedding [d*h*w, dim] (MAE-style, one third of the channels per axis)."""
    per_axis = 2 * (dim // 6)
    out = []
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / max(per_axis // 2, 1)))
    for coord in axes:
        angles = coord.reshape(-1, 1) * omega.reshape(1, -1)
        out += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(out, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(device=device, dtype=dtype)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (global), via scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class InputWindows(nn.Module):
    """x [B,1,...] in [0,1] (HU window `hu_window`) -> [B,1+K,...]: x and x re-windowed to each of K (low, high) HU.

    No parameters: clamp((hu - low) / (high - low), 0, 1) per window, hu = low0 + x * (high0 - low0). Values
    clipped by `hu_window` stay clipped (a window reaching past it sees the clipped image).
    """

    def __init__(self, windows_hu: tuple[tuple[float, float], ...], hu_window: tuple[float, float]) -> None:
        super().__init__()
        lo0, hi0 = (float(v) for v in hu_window)
        lows = torch.tensor([float(w[0]) for w in windows_hu], dtype=torch.float32)
        highs = torch.tensor([float(w[1]) for w in windows_hu], dtype=torch.float32)
        # channel k = x * scale_k + shift_k, clamped: one fused affine per window
        self.register_buffer("scale", (hi0 - lo0) / (highs - lows), persistent=False)
        self.register_buffer("shift", (lo0 - lows) / (highs - lows), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        extra = (x * self.scale.reshape(shape).to(x.dtype) + self.shift.reshape(shape).to(x.dtype)).clamp(0.0, 1.0)
        return torch.cat([x, extra], dim=1)


class ResidualConv(nn.Module):
    """x + GELU(GroupNorm(conv3x3x3(x))); the norm's scale starts at 0, so a new block starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        nn.init.zeros_(self.norm.weight)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.norm(self.conv(x)))


class ConvStem(nn.Module):
    """Strided 3D conv stages (conv + GroupNorm + GELU, then `blocks[k]` `ResidualConv` blocks) and a 1x1x1 conv
    to the embedding dim."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[tuple[int, int, int], ...], embed_dim: int,
                 in_channels: int = 1, blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index in `net` of each stage's last layer
        cin = in_channels
        for k, (cout, stride) in enumerate(zip(channels, strides)):
            layers += [
                # kernel s+2 with padding 1 centres output t at input s*t + (s-1)/2, the voxel-centre convention
                # that heatmaps and depth bins assume (a 3x3x3 stride-2 conv would sit half a stride off).
                nn.Conv3d(cin, cout, kernel_size=tuple(s + 2 for s in stride), stride=tuple(stride), padding=1,
                          bias=False),
                nn.GroupNorm(_groups(cout), cout),
                nn.GELU(),
            ]
            layers += [ResidualConv(cout) for _ in range(blocks[k] if blocks else 0)]
            self.stage_ends.append(len(layers) - 1)
            cin = cout
        layers.append(nn.Conv3d(cin, embed_dim, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def zero_init_residuals(self) -> None:
        """Start every `ResidualConv` as the identity again (after a generic init that reset its norm's scale)."""
        for m in self.net:
            if isinstance(m, ResidualConv):
                nn.init.zeros_(m.norm.weight)

    def stages(self, x: Tensor, return_stage: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The conv stages without the 1x1x1 projection -> (last stage [B, C_last, d, h, w], output of stage
        `return_stage` (after its residual blocks), or None)."""
        skip = None
        last = -1 if return_stage is None else self.stage_ends[return_stage]
        for i, layer in enumerate(self.net[:-1]):
            x = layer(x)
            if i == last:
                skip = x
        return x, skip

    def forward(self, x: Tensor, return_stage: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x -> [B, embed_dim, d, h, w]; with `return_stage` k also the output of conv stage k."""
        if return_stage is None:
            return self.net(x)
        stem, skip = self.stages(x, return_stage)
        return self.net[-1](stem), skip


class DenseHead(nn.Module):
    """FPN-style decoder: upsampled transformer features + 1x1x1 lateral of a finer stem stage -> conv mix.

    forward(features [B,d,h,w,C], skip [B,Cs,D',H',W']) -> mixed [B,Cd,D',H',W'] (conv3x3x3 + GroupNorm + GELU).
    The top-down 1x1x1 projection runs on the coarse grid before the (linear) trilinear upsampling: same result,
    fewer FLOPs.
    """

    def __init__(self, embed_dim: int, skip_channels: int, dim: int) -> None:
        super().__init__()
        self.top = nn.Conv3d(embed_dim, dim, kernel_size=1)
        self.lateral = nn.Conv3d(skip_channels, dim, kernel_size=1)
        self.mix = nn.Sequential(nn.Conv3d(dim, dim, kernel_size=3, padding=1, bias=False),
                                 nn.GroupNorm(_groups(dim), dim), nn.GELU())

    def forward(self, features: Tensor, skip: Tensor) -> Tensor:
        top = self.top(features.permute(0, 4, 1, 2, 3))
        top = F.interpolate(top, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.mix(top + self.lateral(skip))


class PatchEmbed(nn.Module):
    """Non-overlapping (anisotropic allowed) 3D patches -> embed_dim, as a strided conv."""

    def __init__(self, patch_size: tuple[int, int, int], embed_dim: int, in_channels: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class VisionEncoder(nn.Module):
    """Tokeniser (patch embedding or conv stem) + position embedding + global-attention transformer.

    forward(x [B,1,D,H,W]) -> features [B, d, h, w, C] (after the final LayerNorm); with `return_skip` (hybrid
    only) -> (features, output of stem stage `config.dense_stage` [B, Cs, D', H', W']) for the dense head.
    With `config.input_windows_hu` the tokenizer sees x and its re-windowed copies (`InputWindows`); with
    `config.input_blob_scales_mm` also its Hessian blobness (`HessianBlobness`), computed here from x [B,1,...] or
    given precomputed after the image, x [B,1+S,...] (the training cache stores them: ~0.15 s per volume and scale
    pair on one CPU thread, too slow to repeat in every step).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config.embed_dim
        cin = config.input_channels()
        self.windows = InputWindows(config.input_windows_hu, config.hu_window) if config.input_windows_hu else None
        self.blobs = (HessianBlobness(config.input_blob_scales_mm, config.spacing)
                      if config.input_blob_scales_mm else None)
        if config.encoder == "vit":
            self.tokenizer: nn.Module = PatchEmbed(config.patch_size, c, cin)
        else:
            self.tokenizer = ConvStem(config.stem_channels, config.stem_strides, c, cin, config.stem_blocks)
        self.grid = config.transformer_grid()
        if config.pos_embed == "learnable":
            self.pos_embed = nn.Parameter(sincos_pos_embed_3d(self.grid, c).reshape(1, *self.grid, c).clone())
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, c).reshape(1, *self.grid, c),
                                 persistent=False)
        self.blocks = nn.ModuleList(
            [Block(c, config.num_heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)]
        )
        self.norm = nn.LayerNorm(c)
        self.grad_checkpointing = config.grad_checkpointing
        self.apply(_init_weights)
        if isinstance(self.tokenizer, ConvStem):
            self.tokenizer.zero_init_residuals()

    def _pos(self, grid: tuple[int, int, int], x: Tensor) -> Tensor:
        if tuple(grid) == tuple(self.grid):
            return self.pos_embed.to(x.dtype)
        if self.config.pos_embed == "sincos":
            return sincos_pos_embed_3d(grid, x.shape[-1], x.device, x.dtype).reshape(1, *grid, -1)
        pos = self.pos_embed.permute(0, 4, 1, 2, 3)
        pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        return pos.permute(0, 2, 3, 4, 1).to(x.dtype)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Hybrid only: (features [B,d,h,w,C], dense-stage skip or None, last conv stage [B,Cs,d,h,w] before the
        1x1 projection) — the CNN features feed the pooled embedding's CNN branch."""
        if self.config.encoder != "hybrid":
            raise ValueError("forward_features needs the hybrid encoder")
        stage = self.config.dense_stage_index() if self.config.uses_dense_head() else None
        stem, skip = self.tokenizer.stages(self._channels(x), stage)
        return self._transform(self.tokenizer.net[-1](stem)), skip, stem

    def _transform(self, f: Tensor) -> Tensor:
        b, c, d, h, w = f.shape
        f = f.permute(0, 2, 3, 4, 1) + self._pos((d, h, w), f)
        t = f.reshape(b, d * h * w, c)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and t.requires_grad:
                t = checkpoint(blk, t, use_reentrant=False)
            else:
                t = blk(t)
        return self.norm(t).reshape(b, d, h, w, c)

    def _channels(self, x: Tensor) -> Tensor:
        """[B,1,...] image or [B,1+S,...] image + precomputed blobness -> the tokenizer's input channels."""
        x = self.with_blobs(x)
        image, blobs = x[:, :1], x[:, 1:]
        parts = [self.windows(image) if self.windows is not None else image]
        return torch.cat(parts + [compress(blobs).to(image.dtype)], dim=1) if blobs.shape[1] else parts[0]

    def with_blobs(self, x: Tensor) -> Tensor:
        """[B,1,...] -> [B,1+S,...] image + raw blobness (computed here) with `config.input_blob_scales_mm`; an input
        that already carries them, or a config without them, passes unchanged."""
        n_blob = len(self.config.input_blob_scales_mm)
        if x.ndim != 5 or x.shape[1] not in (1, 1 + n_blob):
            want = "[B,1,D,H,W]" + (f" or [B,{1 + n_blob},D,H,W]" if n_blob else "")
            raise ValueError(f"expected images {want}, got {tuple(x.shape)}")
        if self.blobs is None or x.shape[1] == 1 + n_blob:
            return x
        return torch.cat([x, self.blobs(x).to(x.dtype)], dim=1)

    def forward(self, x: Tensor, return_skip: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = self._channels(x)
        skip = None
        if return_skip:
            if self.config.encoder != "hybrid":
                raise ValueError("return_skip needs the hybrid encoder")
            f, skip = self.tokenizer(x, return_stage=self.config.dense_stage_index())
        else:
            f = self.tokenizer(x)  # [B, C, d, h, w]
        out = self._transform(f)
        return (out, skip) if return_skip else out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv3d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["VisionEncoder", "ConvStem", "ResidualConv", "DenseHead", "InputWindows", "PatchEmbed", "Block", "Attention",
           "sincos_pos_embed_3d", "count_parameters"]
