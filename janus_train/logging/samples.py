"""Every `logging.sample_every` steps: a grid of CFG samples from fixed prompts.

Saved as `<run_dir>/samples/step_XXXXXXXX.png` (one row per prompt, the prompt under each image,
small images scaled up so a person can read them) and logged to W&B. Janus-Pro samples VQ codes
and decodes them with its VQ; JanusFlow runs its Euler ODE (inference/flow.py) and decodes with
the run's VAE (`model.vae`).
Under ZeRO-3 the parameters are partitioned, so every rank runs the sampler (the gathers are
collectives) and rank 0 writes; otherwise rank 0 samples alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from janus_train.inference.flow import FlowSampleConfig, check_vae, generate_latents, latents_to_images, load_vae
from janus_train.inference.t2i import SampleConfig, codes_to_images, generate_codes, prompt_grid
from janus_train.logging.callback import Callback
from janus_train.models.families import family_of_config


class SampleGrids(Callback):
    def __init__(self, run_dir, every: int, prompts: list[str], num: int, cfg_weight: float, seed: int, tokenizer, wandb_logger=None,
                 vae_path: str | None = None):
        self.dir = Path(run_dir) / "samples"
        self.every, self.prompts, self.num = every, list(prompts), num
        self.cfg_weight, self.seed = cfg_weight, seed
        self.tok = tokenizer
        self.wandb = wandb_logger
        self.vae_path = vae_path  # JanusFlow: the VAE that decodes its latents
        self._vae = None

    def _draw(self, model, prompt: str, gen: torch.Generator, zero3: bool) -> list[np.ndarray]:
        if family_of_config(model.config).gen_kind == "flow":
            if self._vae is None:
                self._vae = load_vae(self.vae_path, device=gen.device)
                check_vae(self._vae, model.config)
            latents = generate_latents(model, self.tok, prompt, self.num, FlowSampleConfig(cfg_weight=self.cfg_weight), generator=gen)
            return list(latents_to_images(self._vae, latents))
        codes = generate_codes(model, self.tok, prompt, self.num, SampleConfig(cfg_weight=self.cfg_weight), generator=gen)
        with _gathered(model.vq, zero3):
            return list(codes_to_images(model, codes))

    def on_step_end(self, trainer, stage, record) -> None:
        if self.every and record.step % self.every == 0:
            self.sample(trainer, record.step)

    def on_stage_end(self, trainer, stage) -> None:
        if self.every:
            self.sample(trainer, trainer.global_step)

    def sample(self, trainer, step: int) -> Path | None:
        # The weights to sample with (the average when train.ema_decay > 0): every rank takes part.
        with trainer.inference_weights():
            return self._sample(trainer, step)

    def _sample(self, trainer, step: int) -> Path | None:
        zero3 = trainer.zero_stage == 3
        if not zero3 and trainer.dist.rank != 0:
            return None
        model = trainer.engine.module
        was_training = model.training
        model.eval()
        images: list[np.ndarray] = []
        try:
            for prompt in self.prompts:
                # Same seed per prompt: the grid at step k and step k+n differ only by training.
                gen = torch.Generator(device=trainer.dist.device).manual_seed(self.seed)
                with torch.no_grad():
                    images.extend(self._draw(model, prompt, gen, zero3))
        finally:
            model.train(was_training)
        if trainer.dist.rank != 0:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:08d}.png"
        grid = np.asarray(prompt_grid(images, [p for p in self.prompts for _ in range(self.num)], cols=self.num))
        Image.fromarray(grid).save(path)
        if self.wandb is not None:
            self.wandb.log_images(step, {"samples/grid": grid})
        return path


def _gathered(module, zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
