"""LlamaGen VQ-16 image tokenizer: conv encoder, cosine codebook lookup, conv decoder.

Frozen in every Janus-Pro stage. Used offline to pre-tokenise generation images
(`encode_codes`) and at sampling time to turn generated codes into pixels (`decode_codes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from janus_train.models.janus.config import VQConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial grid (1x1 conv projections)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))  # [b, hw, c]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (right/bottom) padding, as the released tokenizer was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block1 = ResBlock(ch, ch, groups)
        self.attn = AttnBlock(ch, groups)
        self.block2 = ResBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention at the coarsest level) + resample."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, with_attn: bool, resample: nn.Module | None, groups: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        for _ in range(num_blocks):
            self.blocks.append(ResBlock(in_ch, out_ch, groups))
            in_ch = out_ch
            if with_attn:
                self.attns.append(AttnBlock(out_ch, groups))
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attns):
                x = self.attns[i](x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mults = cfg.channel_multipliers
        base = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = base
        last = len(mults) - 1
        for i, mult in enumerate(mults):
            out = base * mult
            down = Downsample(out) if i != last else None
            self.levels.append(Level(ch, out, cfg.num_res_blocks, with_attn=i == last, resample=down, groups=cfg.norm_groups))
            ch = out
        self.mid = MidBlock(ch, cfg.norm_groups)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Levels are stored in execution order: levels[0] is the coarsest resolution."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mults = cfg.channel_multipliers
        base = cfg.base_channels
        ch = base * mults[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg.norm_groups)
        self.levels = nn.ModuleList()
        last = len(mults) - 1
        for i in reversed(range(len(mults))):
            out = base * mults[i]
            up = Upsample(out) if i != 0 else None
            self.levels.append(Level(ch, out, cfg.num_res_blocks + 1, with_attn=i == last, resample=up, groups=cfg.norm_groups))
            ch = out
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.code_dim, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def _codebook(self) -> torch.Tensor:
        w = self.codebook.weight
        return F.normalize(w, p=2, dim=-1) if self.cfg.codebook_l2_norm else w

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels in [-1, 1] -> long [B, (H/16)*(W/16)] codes, row-major."""
        z = self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        book = self._codebook().float()
        if self.cfg.codebook_l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        # argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e); ||z||^2 is constant per row.
        dist = (book * book).sum(1)[None, :] - 2.0 * flat @ book.t()
        return dist.argmin(dim=1).view(b, h * w)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """long [B, N] codes (N a square) -> [B, 3, H, W] pixels, roughly in [-1, 1]."""
        b, n = codes.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"decode_codes needs a square number of codes per image, got {n}")
        z = self._codebook()[codes].view(b, side, side, -1).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(z))
