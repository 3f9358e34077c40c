"""JanusFlow's generation encoder and decoder: shallow ConvNeXt stacks around the LLM.

    encoder:  latent z_t [N, C, h, w] -> patchify conv (stride p) -> ConvNeXt blocks (FiLM on t)
              -> features [N, width, h/p, w/p] (the LLM tokens, after the aligner) + the time
              embedding [N, llm_hidden] (an LLM token of its own) + the skip (the features)
    decoder:  LLM outputs as a grid [N, width, h/p, w/p] -> RMSNorm -> concat the skip ->
              ConvNeXt blocks (FiLM on t) -> RMSNorm -> 1x1 conv -> pixel shuffle -> velocity

The layer order and names follow DeepSeek's inference code (`janus/janusflow/models/uvit.py`),
so the release's weights load by renaming prefixes only (keys.py); the time embedding uses
diffusers' sinusoidal projection and MLP, as the release does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from janus_train.models.janusflow.config import FlowConfig
from janus_train.models.llm import RMSNorm


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN over channels-last [N, H, W, C]; zero-initialised, so identity at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * nx + 1, x)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> Linear -> GELU -> GRN -> Linear, residual; then the whole
    output is modulated by the time embedding (x * (1 + scale) + shift)."""

    def __init__(self, channels: int, cond_dim: int, ffn_factor: int, eps: float):
        super().__init__()
        inner = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.norm = RMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner)
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels)
        self.cond_embeds_mapper = nn.Linear(cond_dim, channels * 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = self.channelwise_linear_2(self.channelwise_norm(F.gelu(self.channelwise_linear_1(self.norm(h)))))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return torch.addcmul(shift[:, :, None, None], x, (1 + scale)[:, :, None, None])


class _Blocks(nn.Module):
    """A stack of ConvNeXt blocks sharing one conditioning (DeepSeek's `mid_block.res_blocks`)."""

    def __init__(self, channels: int, n: int, cond_dim: int, ffn_factor: int, eps: float):
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, cond_dim, ffn_factor, eps) for _ in range(n))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


def _channels_last_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FlowEncoder(nn.Module):
    """z_t and t -> (token features [N, width, g, g], time embedding [N, cond_dim], skip)."""

    def __init__(self, cfg: FlowConfig, cond_dim: int):
        super().__init__()
        self.time_proj = Timesteps(cfg.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cfg.width, cond_dim)
        padding = math.ceil(cfg.kernel_size - cfg.patch_size)
        self.in_conv = nn.Conv2d(cfg.latent_channels, cfg.width, kernel_size=cfg.kernel_size, stride=cfg.patch_size, padding=padding)
        self.mid_block = _Blocks(cfg.width, cfg.encoder_blocks, cond_dim, cfg.ffn_factor, cfg.norm_eps)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`t` in [0, 1000] (the release's scale: flow time x 1000), one per image."""
        t_emb = self.time_embed(self.time_proj(t.flatten()).to(z.dtype))
        x = self.mid_block(self.in_conv(z), t_emb)
        return x, t_emb, x


class Unpatchify(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, patch_size: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size * patch_size, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_channels_last_norm(self.norm, x)))


class FlowDecoder(nn.Module):
    """LLM features as a grid [N, width, g, g] + skip + time embedding -> velocity [N, C, h, w]."""

    def __init__(self, cfg: FlowConfig, cond_dim: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mid_block = _Blocks(2 * cfg.width, cfg.decoder_blocks, cond_dim, cfg.ffn_factor, cfg.norm_eps)
        self.out_convs = nn.ModuleList([Unpatchify(2 * cfg.width, cfg.latent_channels, cfg.patch_size, cfg.norm_eps)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([_channels_last_norm(self.input_norm, x), skip], dim=1)
        x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x
