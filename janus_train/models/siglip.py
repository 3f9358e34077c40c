"""SigLIP ViT (the understanding encoder), without its attention-pool head.

A pre-norm ViT: conv patch embedding + learned absolute positions, L blocks of
LayerNorm -> MHA (with biases) and LayerNorm -> GELU MLP, then a final LayerNorm. The output
is the full token grid (576 tokens at 384 px / patch 16), which the aligner maps to the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    """SigLIP ViT used for understanding (attention-pool head dropped) + its aligner MLP."""

    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    aligner_depth: int = 2


# SigLIP sizes DeepSeek's releases name by `model_name` instead of listing them.
DEEPSEEK_VISION_MODELS = {
    "siglip_large_patch16_384": dict(hidden_size=1024, num_layers=24, num_heads=16, patch_size=16, mlp_ratio=4.0),
}


def vision_from_deepseek(params: dict, aligner_depth: int) -> VisionConfig:
    """VisionConfig from a DeepSeek `CLIPVisionTower` params dict. Checkpoints at other sizes
    (our tiny test models) carry their sizes explicitly as `janus_train_sizes`."""
    sizes = params.get("janus_train_sizes") or DEEPSEEK_VISION_MODELS.get(params.get("model_name", ""))
    if sizes is None:
        raise ValueError(f"unknown DeepSeek vision model_name {params.get('model_name')!r}")
    return VisionConfig(image_size=params.get("image_size", 384), aligner_depth=aligner_depth, **sizes)


def deepseek_vision_params(vis: VisionConfig) -> dict:
    """The `CLIPVisionTower` params dict of `vis` (the inverse of `vision_from_deepseek`)."""
    sizes = dict(hidden_size=vis.hidden_size, num_layers=vis.num_layers, num_heads=vis.num_heads, patch_size=vis.patch_size, mlp_ratio=vis.mlp_ratio)
    params: dict = {"image_size": vis.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}
    if sizes != DEEPSEEK_VISION_MODELS["siglip_large_patch16_384"]:
        params["janus_train_sizes"] = sizes
    return params


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        inner = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden_size, inner)
        self.fc2 = nn.Linear(inner, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


_PIXEL_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def normalize_uint8_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> SigLIP-normalised `dtype`, on the pixels' device.

    The loader ships und images as uint8 (a quarter of the float32 bytes to copy to the
    device, and no float pass over every pixel on the loader's CPU); they are normalised here.
    A 256-entry table computed by the loader's own `normalize_siglip` keeps the values
    bit-identical to transformers' processor on every device (a GPU may divide by a scalar
    through its reciprocal, which rounds differently for some inputs).
    """
    key = (pixels.device, dtype)
    table = _PIXEL_TABLES.get(key)
    if table is None:
        from janus_train.contracts.preprocess import normalize_siglip

        table = normalize_siglip(torch.arange(256, dtype=torch.uint8)).to(device=pixels.device, dtype=dtype)
        _PIXEL_TABLES[key] = table
    return table[pixels.long()]


class SigLIPVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, cfg.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, num_patches, hidden]: uint8 (raw, normalised here) or
        floating (already SigLIP-normalised)."""
        if pixel_values.shape[-1] != self.cfg.image_size or pixel_values.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"vision tower expects {self.cfg.image_size}x{self.cfg.image_size} images, got {tuple(pixel_values.shape)}"
            )
        dtype = self.patch_embed.weight.dtype
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_uint8_pixels(pixel_values, dtype)
        elif not pixel_values.is_floating_point():
            raise TypeError(f"pixel values must be uint8 or floating, got {pixel_values.dtype}")
        x = self.patch_embed(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.post_norm(x)
