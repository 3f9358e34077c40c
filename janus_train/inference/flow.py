"""JanusFlow text-to-image sampling: rectified-flow Euler ODE in the LLM, classifier-free guidance,
then the VAE decoder.

The loop is DeepSeek's (demo/app_janusflow.py, `generate`): z ~ N(0, I) of shape
[n, C, latent, latent]; for step = 0 .. steps-1, with t = step / steps (x1000 inside the
generation encoder), the encoder turns z into a time embedding and G latent tokens; a row is

    cond:    BOS, prompt ..., t_emb, G latent tokens     (the gen prompt without its final
                                                          <begin_of_image>: t_emb takes that slot)
    uncond:  BOS,             t_emb, G latent tokens

the LLM's outputs at the latent positions are decoded to velocities, combined as
v = w v_cond - (w - 1) v_uncond, and z += v / steps. The VAE decodes z / scaling_factor.

Unconditional rows. DeepSeek keeps them at full length and hides the prompt keys 1..P-1 with an
attention mask (P: the time slot's index). We feed the shorter row [BOS, t_emb, latents] with
position ids [0, P, P+1, ...] instead: under RoPE attention depends on positions only through
their differences, so this is the same computation as the masked full row, and it is how
training represents a gen document whose prompt was dropped for guidance.

The prompt is computed once: the cond rows' [BOS, prompt] and the uncond rows' [BOS] go into two
KV caches before the first step; every step runs only (t_emb, latents) through the LLM on top
of them (two calls, cond and uncond, positions P ...) and rewinds the caches to the prompt
afterwards. DeepSeek's demo recomputes the whole sequence every step (its cache trimming is a
no-op); the causal mask makes both give the same outputs. z accumulates in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from janus_train.contracts.tokens import TokenizerInfo
from janus_train.inference.t2i import prompt_ids


@dataclass
class FlowSampleConfig:
    steps: int = 30  # Euler steps of the ODE from t = 0 (noise) to t = 1 (image)
    cfg_weight: float = 2.0  # v = w v_cond - (w - 1) v_uncond; 1 is the conditional ODE alone

    def validate(self) -> "FlowSampleConfig":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.cfg_weight, (int, float)) or not math.isfinite(self.cfg_weight) or self.cfg_weight < 0:
            raise ValueError(f"cfg_weight must be a finite number >= 0, got {self.cfg_weight!r}")
        return self


@torch.no_grad()
def generate_latents(
    model,
    tokenizer,
    caption: str,
    num_images: int = 1,
    sample: FlowSampleConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """fp32 [num_images, C, latent, latent]: VAE latents (scaled as the VAE's training scales them,
    i.e. decode z / scaling_factor) for `caption` from a JanusFlowModel. The noise is one fp32
    `torch.randn` draw of that shape on the model's device from `generator`."""
    sc = (sample or FlowSampleConfig()).validate()
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    cfg = model.config
    emb = model.llm.embed_tokens
    device, dtype = emb.weight.device, emb.weight.dtype
    backend = cfg.attention
    tok = TokenizerInfo.of(tokenizer)
    ids = prompt_ids(tok, caption)[:-1]  # the time embedding takes <begin_of_image>'s slot
    p, g, n = len(ids), cfg.num_gen_tokens, num_images
    guided = sc.cfg_weight != 1.0  # w = 1: v = v_cond, the unconditional rows are not needed

    cond_cache = model.new_cache(n, p + 1 + g)
    model.llm.decode_step(emb(torch.tensor([ids] * n, device=device)), cond_cache, backend)
    if guided:
        uncond_cache = model.new_cache(n, 2 + g)
        model.llm.decode_step(emb(torch.full((n, 1), tok.bos_id, device=device)), uncond_cache, backend)
    rows = 2 * n if guided else n
    pos = torch.arange(p, p + 1 + g, device=device)[None].expand(n, -1)

    side, channels = cfg.latent_size, cfg.flow.latent_channels
    z = torch.randn((n, channels, side, side), generator=generator, device=device, dtype=torch.float32)
    dt = 1.0 / sc.steps
    steps = range(sc.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="flow steps", unit="step")
    for step in steps:
        z_in = (torch.cat([z, z]) if guided else z).to(dtype)
        t = torch.full((rows,), step / sc.steps, device=device, dtype=torch.float32)
        tokens, t_emb, skip = model.encode_latents(z_in, t)
        x = torch.cat([t_emb[:, None].to(dtype), tokens.to(dtype)], dim=1)  # [rows, 1 + G, H]
        hidden = [model.llm.decode_step(x[:n], cond_cache, backend, pos)]
        cond_cache.rewind(p)
        if guided:
            hidden.append(model.llm.decode_step(x[n:], uncond_cache, backend, pos))
            uncond_cache.rewind(1)
        v = model.decode_velocity(torch.cat(hidden)[:, 1:], skip, t_emb).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = sc.cfg_weight * v_cond - (sc.cfg_weight - 1.0) * v_uncond
        z = z + dt * v
    return z


def load_vae(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A diffusers `AutoencoderKL` directory (the SDXL-VAE, or `train_tokenizer --kind vae`), in eval mode.
    Raises ValueError naming the directory when it is not one."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a diffusers AutoencoderKL from {path}: {e}") from None
    return vae.to(device).eval()


def check_vae(vae, config) -> None:
    """ValueError unless the VAE's latents are the model's (channels, downsampling)."""
    fl = config.flow
    ch = int(vae.config.latent_channels)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if ch != fl.latent_channels or down != fl.vae_downsample:
        raise ValueError(f"the VAE has {ch} latent channels and downsamples {down}x, the model expects "
                         f"{fl.latent_channels} channels and {fl.vae_downsample}x")


@torch.no_grad()
def latents_to_images(vae, latents: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """uint8 [n, H, W, 3] images: the VAE decodes latents / scaling_factor (`batch_size` at a time),
    clamps to [-1, 1] and maps to [0, 255] (truncating, as DeepSeek's demo does)."""
    scale = float(vae.config.scaling_factor)
    p = next(vae.parameters())
    out = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode((chunk.float() / scale).to(p.device, p.dtype)).sample.float().clamp(-1.0, 1.0)
        out.append(((pixels.permute(0, 2, 3, 1) + 1.0) / 2.0 * 255.0).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)
