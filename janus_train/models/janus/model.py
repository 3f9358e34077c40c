"""Janus-Pro in plain PyTorch: one LLaMA-style decoder, two decoupled visual pathways.

    und:  pixels -> SigLIP -> und_aligner -> replaces <image_placeholder> embeddings
    gen:  VQ codes -> gen_embed -> gen_aligner -> LLM inputs; LLM outputs -> gen_head -> codes
    text: token ids -> embed_tokens; LLM outputs -> lm_head -> next token

`JanusModel.forward(batch)` takes a `PackedBatch` and returns per-task *summed* losses and
supervised-token counts, so the caller can normalise by a global token count. Nothing here
knows about ranks or process groups: parallelism is applied from outside
(janus_train/parallel/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from janus_train.contracts.batch import TASK_ID, TASKS, PackedBatch, mask_positions
from janus_train.models.attention import PackedDocs
from janus_train.models.heads import MLPProjector, per_token_cross_entropy
from janus_train.models.partitioned import Gathered, whole_params
from janus_train.models.janus.config import ALWAYS_FROZEN, COMPONENTS, JanusConfig
from janus_train.models.janus.vq import VQTokenizer
from janus_train.models.llm import KVCache, LanguageModel, RMSNorm
from janus_train.models.siglip import SigLIPVisionTower


class GenHead(nn.Module):
    """LLM hidden -> hidden -> GELU -> logits over the VQ codebook."""

    def __init__(self, hidden: int, inner: int, codebook_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, codebook_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ---------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------


@dataclass
class TaskLosses:
    """Per-task summed cross-entropy and supervised-token counts (for global normalisation)."""

    loss_sum: dict[str, torch.Tensor]
    num_tokens: dict[str, torch.Tensor]

    def total_sum(self) -> torch.Tensor:
        return sum(self.loss_sum.values())


class JanusModel(nn.Module):
    COMPONENTS = COMPONENTS  # submodule names by role (config.py)

    def __init__(self, config: JanusConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.llm = LanguageModel(c.llm)
        self.lm_head = nn.Linear(c.llm.hidden_size, c.llm.vocab_size, bias=False)
        if c.llm.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight
        self.vision = SigLIPVisionTower(c.vision)
        self.und_aligner = MLPProjector(c.vision.hidden_size, c.llm.hidden_size, c.vision.aligner_depth)
        self.vq = VQTokenizer(c.vq)
        self.gen_embed = nn.Embedding(c.vq.codebook_size, c.vq.code_dim)
        self.gen_aligner = MLPProjector(c.vq.code_dim, c.llm.hidden_size, c.vq.gen_aligner_depth)
        self.gen_head = GenHead(c.llm.hidden_size, c.gen_head_hidden, c.vq.codebook_size)
        for name in ALWAYS_FROZEN:
            getattr(self, name).requires_grad_(False)
        self.apply_recompute(c.recompute, c.recompute_every)

    # ---- setup ---------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: int | None = None, gathered: Gathered = whole_params) -> None:
        """Fresh random weights (normal(0, std) linears/embeddings, unit norms). `gathered`
        shows partitioned parameters whole, a few at a time (ZeRO-3: models/partitioned.py)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            with gathered(list(module.parameters(recurse=False))):
                if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                    with torch.no_grad():
                        w = torch.randn(module.weight.shape, generator=gen) * std
                        module.weight.copy_(w.to(module.weight.dtype))
                        if getattr(module, "bias", None) is not None:
                            module.bias.zero_()
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, RMSNorm)):
                    with torch.no_grad():
                        module.weight.fill_(1.0)
                        if getattr(module, "bias", None) is not None:
                            module.bias.zero_()
        with torch.no_grad(), gathered([self.vision.pos_embed, self.vq.codebook.weight]):
            w = torch.randn(self.vision.pos_embed.shape, generator=gen) * std
            self.vision.pos_embed.copy_(w.to(self.vision.pos_embed.dtype))
            if self.config.vq.codebook_l2_norm:
                self.vq.codebook.weight.copy_(F.normalize(self.vq.codebook.weight, dim=-1))

    def apply_recompute(self, mode: str, every: int = 2) -> None:
        """Activation recomputation of the LLM blocks (`LanguageModel.apply_recompute`)."""
        self.llm.apply_recompute(mode, every)

    # ---- embeddings ----------------------------------------------------------------------
    def embed_und_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, llm_hidden]."""
        return self.und_aligner(self.vision(pixel_values))

    def embed_gen_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.gen_aligner(self.gen_embed(codes))

    def embed_inputs(self, batch: PackedBatch, touch_all: bool = False) -> torch.Tensor:
        # Which paths run, and how many positions each takes, come from the batch's host counts:
        # nothing here waits for the device.
        counts = batch.host_counts()
        ids = batch.input_ids
        gen_mask = batch.gen_input_mask
        text_ids = ids.masked_fill(gen_mask | batch.und_image_mask, 0)
        x = self.llm.embed_tokens(text_ids)
        if counts["gen_inputs"]:
            gen_vals = self.embed_gen_codes(ids.reshape(-1)[mask_positions(gen_mask, counts["gen_inputs"])])
            x = x.masked_scatter(gen_mask[..., None], gen_vals.to(x.dtype))
        elif touch_all:
            x = x + 0.0 * self.embed_gen_codes(ids.new_zeros(1)).sum()
        if batch.und_pixel_values is not None and batch.und_pixel_values.shape[0] > 0:
            feats = self.embed_und_images(batch.und_pixel_values)
            n_pos = counts["und_image_positions"]
            if n_pos != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"und_image_mask marks {n_pos} positions but {feats.shape[0]} images give "
                    f"{feats.shape[0] * feats.shape[1]} features"
                )
            x = x.masked_scatter(batch.und_image_mask[..., None], feats.reshape(-1, feats.shape[-1]).to(x.dtype))
        elif touch_all:
            size = self.config.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=x.device, dtype=x.dtype)
            x = x + 0.0 * self.embed_und_images(dummy).sum()
        return x

    # ---- forward -------------------------------------------------------------------------
    def hidden_states(self, batch: PackedBatch, touch_all: bool = False) -> torch.Tensor:
        """Final-normed LLM hidden states [R, S, H] for a packed batch."""
        docs = PackedDocs.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen, batch.num_rows, batch.seq_len)
        x = self.embed_inputs(batch, touch_all=touch_all)
        return self.llm(x, batch.position_ids, docs, self.config.attention)

    def forward(self, batch: PackedBatch, touch_all: bool = False) -> TaskLosses:
        """Per-task summed CE and token counts.

        `touch_all=True` runs every trainable branch even when the batch lacks its task
        (on dummy input, scaled by 0) so that every rank touches the same parameters in every
        micro-step; ZeRO-3 gathers hang otherwise.
        """
        hidden = self.hidden_states(batch, touch_all=touch_all)
        counts = batch.host_counts()
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        labels = batch.labels.reshape(-1)
        task = batch.loss_task.reshape(-1)
        loss_sum: dict[str, torch.Tensor] = {}
        num_tokens: dict[str, torch.Tensor] = {}
        zero = flat_h.new_zeros((), dtype=torch.float32)

        # Heads run only on supervised positions: the 102400-way lm_head never sees image tokens.
        text_sel = (task == TASK_ID["und"]) | (task == TASK_ID["text"])
        gen_sel = task == TASK_ID["gen"]
        heads = ((self.lm_head, text_sel, ("und", "text")), (self.gen_head, gen_sel, ("gen",)))
        for head, sel, names in heads:
            n_sel = sum(counts[name] for name in names)
            if n_sel:
                idx = mask_positions(sel, n_sel)
                ce = per_token_cross_entropy(head, flat_h[idx], labels[idx])
                t = task[idx]
                for name in names:
                    m = t == TASK_ID[name]
                    loss_sum[name] = (ce * m).sum()
                    num_tokens[name] = m.sum()
            else:
                extra = 0.0 * head(flat_h[:1]).float().sum() if touch_all else zero
                for name in names:
                    loss_sum[name] = extra + zero
                    num_tokens[name] = torch.zeros((), dtype=torch.long, device=flat_h.device)
        return TaskLosses({n: loss_sum[n] for n in TASKS}, {n: num_tokens[n] for n in TASKS})

    def token_losses(self, batch: PackedBatch) -> torch.Tensor:
        """fp32 [R, S]: the CE of every supervised position's label (0 elsewhere), for scoring
        documents one by one (evaluation: validation loss, multiple choice by likelihood)."""
        hidden = self.hidden_states(batch)
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        labels = batch.labels.reshape(-1)
        task = batch.loss_task.reshape(-1)
        out = flat_h.new_zeros(labels.shape, dtype=torch.float32)
        text_sel = (task == TASK_ID["und"]) | (task == TASK_ID["text"])
        for head, sel in ((self.lm_head, text_sel), (self.gen_head, task == TASK_ID["gen"])):
            idx = sel.nonzero(as_tuple=True)[0]
            if idx.numel():
                out[idx] = per_token_cross_entropy(head, flat_h[idx], labels[idx]).float()
        return out.view_as(batch.labels)

    # ---- logits for evaluation and parity checks -----------------------------------------
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def gen_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gen_head(hidden)

    # ---- incremental decoding (inference) ------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.llm.new_cache(batch, max_len)

    def decode_step(self, inputs_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run new positions [B, T, H] through the LLM with the cache; returns hidden [B, T, H]."""
        return self.llm.decode_step(inputs_embeds, cache, self.config.attention)
