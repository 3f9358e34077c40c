"""JanusFlow in plain PyTorch: the LLM, SigLIP and aligner code of Janus-Pro, with rectified-flow
generation in the same LLM.

    und:  pixels -> SigLIP -> linear aligner; the learned `und_begin` embedding, then the image's
          features, replace the image's placeholder positions (1 + patches per image)
    gen:  a document is (prompt, time token, G latent tokens), attended causally like the rest
          of the row (DeepSeek's inference runs the LLM with a plain causal mask). The latent
          z_t = t x1 + (1 - t) z0 goes through the generation encoder: its time embedding fills
          the time position, its G patch features (through `gen_enc_aligner`) the latent
          positions. The LLM's outputs at the latent positions -> `gen_dec_norm` ->
          `gen_dec_aligner` -> generation decoder (with the encoder's skip) -> velocity v,
          trained towards x1 - z0 (MSE). REPA: the outputs of LLM block `flow.repa_layer` at the
          latent positions, through `repa_proj`, are pulled towards SigLIP's features of the
          clean image (cosine; SigLIP gets no gradient from it).
    text: token ids -> embed_tokens; LLM outputs -> lm_head -> next token

The input is the packed batch of both families (`contracts.batch.PackedBatch`, with its JanusFlow
fields). Noise z0 and times t come from it (the data loader draws them from its own seeded
stream), so a resumed run replays them bit for bit. Nothing here knows about ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from janus_train.contracts.batch import PackedBatch, mask_positions
from janus_train.models.partitioned import Gathered, whole_params
from janus_train.models.attention import PackedDocs
from janus_train.models.heads import MLPProjector, per_token_cross_entropy
from janus_train.models.janusflow.config import COMPONENTS, TRAINING_ONLY, JanusFlowConfig
from janus_train.models.janusflow.uvit import FlowDecoder, FlowEncoder
from janus_train.models.llm import LanguageModel, RMSNorm
from janus_train.models.siglip import SigLIPVisionTower

# The release scales flow time [0, 1] by 1000 before its sinusoidal embedding.
TIME_SCALE = 1000.0


# The losses JanusFlowModel reports, in order.
LOSSES: tuple[str, ...] = ("und", "text", "flow", "repa")


class FlowLosses(NamedTuple):
    """Summed per-task losses and their normalisers: CE tokens for und/text, latent elements
    for flow, latent tokens for REPA.

    A NamedTuple, not a dataclass: ZeRO-3 finds the output tensors of a tuple (not of a
    dataclass) to hook the model's backward, which re-gathers the parameters that sit directly
    on the model (`und_begin`); without that hook they stay partitioned and backward fails."""

    loss_sum: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]


class JanusFlowModel(nn.Module):
    COMPONENTS = COMPONENTS  # submodule names by role (config.py)

    def __init__(self, config: JanusFlowConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        h, fl = c.llm.hidden_size, c.flow
        self.llm = LanguageModel(c.llm)
        self.lm_head = nn.Linear(h, c.llm.vocab_size, bias=False)
        if c.llm.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight
        self.vision = SigLIPVisionTower(c.vision)
        self.und_aligner = MLPProjector(c.vision.hidden_size, h, 1)
        self.und_begin = nn.Parameter(torch.zeros(1, h))
        self.gen_encoder = FlowEncoder(fl, h)
        self.gen_enc_aligner = nn.Linear(fl.width, h)
        self.gen_dec_norm = RMSNorm(h, c.llm.rms_norm_eps)
        self.gen_dec_aligner = nn.Linear(h, fl.width)
        self.gen_decoder = FlowDecoder(fl, h)
        self.repa_proj = RepaProjector(h, fl.repa_hidden, c.vision.hidden_size)
        self.llm.apply_recompute(c.recompute, c.recompute_every)

    # ---- setup ---------------------------------------------------------------------------
    def apply_recompute(self, mode: str, every: int = 2) -> None:
        """Activation recomputation of the LLM blocks (`LanguageModel.apply_recompute`)."""
        self.llm.apply_recompute(mode, every)

    def init_weights(self, std: float = 0.02, seed: int | None = None, gathered: Gathered = whole_params) -> None:
        """Fresh random weights: normal(0, std) linears/convs/embeddings, zero biases, unit norms;
        GRN scales stay zero (identity), as ConvNeXt-V2 initialises them. `gathered` shows
        partitioned parameters whole, a few at a time (ZeRO-3: models/partitioned.py)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for module in self.modules():
                with gathered(list(module.parameters(recurse=False))):
                    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                        module.weight.copy_((torch.randn(module.weight.shape, generator=gen) * std).to(module.weight.dtype))
                        if getattr(module, "bias", None) is not None:
                            module.bias.zero_()
                    elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                        module.weight.fill_(1.0)
                        if getattr(module, "bias", None) is not None:
                            module.bias.zero_()
            for p in (self.vision.pos_embed, self.und_begin):
                with gathered([p]):
                    p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
            for name, p in self.named_parameters():
                if ".channelwise_norm." in name:
                    with gathered([p]):
                        p.zero_()
        self.repa_proj.init_(gen, gathered)

    def init_training_only(self, seed: int = 0, gathered: Gathered = whole_params) -> None:
        """Fresh weights for the parts a release checkpoint lacks (the REPA projector)."""
        self.repa_proj.init_(torch.Generator().manual_seed(seed), gathered)

    # ---- pathways ------------------------------------------------------------------------
    def embed_und_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + patches, llm_hidden]: the begin embedding, then the features."""
        feats = self.und_aligner(self.vision(pixel_values))
        begin = self.und_begin.to(feats.dtype)[None].expand(feats.shape[0], 1, -1)
        return torch.cat([begin, feats], dim=1)

    def encode_latents(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t [M, C, h, w], t [M] in [0, 1]) -> (LLM tokens [M, G, H], time embedding [M, H], skip)."""
        feats, t_emb, skip = self.gen_encoder(z_t, t * TIME_SCALE)
        tokens = self.gen_enc_aligner(feats.flatten(2).transpose(1, 2))
        return tokens, t_emb, skip

    def decode_velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """LLM outputs at the latent positions [M, G, H] -> velocity [M, C, h, w]."""
        m, g, _ = hidden.shape
        side = self.config.gen_grid
        x = self.gen_dec_aligner(self.gen_dec_norm(hidden))
        x = x.transpose(1, 2).reshape(m, -1, side, side)
        return self.gen_decoder(x, skip, t_emb)

    # ---- training forward ----------------------------------------------------------------
    def forward(self, batch: PackedBatch, touch_all: bool = False) -> FlowLosses:
        """Summed losses per task (`und`, `text`: CE; `flow`: squared error; `repa`: 1 - cos).

        `touch_all=True` runs every branch the batch lacks on dummy input scaled by 0, so every
        rank touches the same parameters in every micro-step (ZeRO-3 gathers hang otherwise).
        """
        c = self.config
        # Which paths run, and how many positions each takes, come from the batch's host counts:
        # nothing here waits for the device.
        counts = batch.host_counts()
        ids = batch.input_ids
        latent_mask = batch.gen_input_mask
        time_mask = batch.gen_time_mask if batch.gen_time_mask is not None else torch.zeros_like(latent_mask)
        special = batch.und_image_mask | time_mask | latent_mask
        x = self.llm.embed_tokens(ids.masked_fill(special, 0))
        if batch.und_pixel_values is not None and batch.und_pixel_values.shape[0] > 0:
            und = self.embed_und_images(batch.und_pixel_values)
            _scatter_check(counts["und_image_positions"], und, "und_image_mask", "und images")
            x = x.masked_scatter(batch.und_image_mask[..., None], und.reshape(-1, und.shape[-1]).to(x.dtype))
        elif touch_all:
            side = c.vision.image_size
            x = x + 0.0 * self.embed_und_images(torch.zeros(1, 3, side, side, device=x.device, dtype=x.dtype)).sum()
        n_gen = batch.num_gen_docs
        if n_gen:
            x1, z0 = batch.gen_latents.to(x.dtype), batch.gen_noise.to(x.dtype)
            t = batch.gen_t.to(x.dtype)
            z_t = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * z0
            tokens, t_emb, skip = self.encode_latents(z_t, t)
            _scatter_check(counts["gen_inputs"], tokens, "gen_input_mask", "gen documents")
            _scatter_check(counts["gen_time_positions"], t_emb[:, None], "gen_time_mask", "gen documents")
            x = x.masked_scatter(latent_mask[..., None], tokens.reshape(-1, tokens.shape[-1]).to(x.dtype))
            x = x.masked_scatter(time_mask[..., None], t_emb.to(x.dtype))
        elif touch_all:
            # A dummy latent along a real gen document's path (encoder -> LLM input here, LLM
            # output -> decoder and REPA projector below), scaled by 0. A separate branch
            # outside the LLM would make these gradients ready in another order than on a rank
            # with gen documents, and ZeRO-2 reduces its gradient bucket in that order.
            side = c.latent_size
            z = torch.zeros(1, c.flow.latent_channels, side, side, device=x.device, dtype=x.dtype)
            tokens, t_emb, skip = self.encode_latents(z, torch.zeros(1, device=x.device, dtype=x.dtype))
            x = x + 0.0 * (tokens.sum() + t_emb.sum()).to(x.dtype)
        docs = PackedDocs.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen, ids.shape[0], ids.shape[1])
        hidden, mid = self.llm(x, batch.position_ids, docs, c.attention, capture_layer=c.flow.repa_layer)

        loss_sum: dict[str, torch.Tensor] = {}
        count: dict[str, torch.Tensor] = {}
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        labels, task = batch.labels.reshape(-1), batch.loss_task.reshape(-1)
        n_sup = counts["und"] + counts["text"] + counts["gen"]
        zero = flat_h.new_zeros((), dtype=torch.float32)
        if n_sup:
            idx = mask_positions(task >= 0, n_sup)
            ce = per_token_cross_entropy(self.lm_head, flat_h[idx], labels[idx]).float()
            for name, tid in (("und", 0), ("text", 1)):
                m = task[idx] == tid
                loss_sum[name] = (ce * m).sum()
                count[name] = m.sum()
        else:
            extra = 0.0 * self.lm_head(flat_h[:1]).float().sum() if touch_all else zero
            for name in ("und", "text"):
                loss_sum[name] = extra + zero
        if n_gen:
            g = c.num_gen_tokens
            latent_idx = mask_positions(latent_mask, counts["gen_inputs"])
            gen_h = flat_h[latent_idx].view(n_gen, g, -1)
            v = self.decode_velocity(gen_h, skip, t_emb)
            target = (x1 - z0).float()
            loss_sum["flow"] = (v.float() - target).pow(2).sum()
            # A fill, not torch.tensor(n, device=...): a blocking host-to-device copy waits for the device.
            count["flow"] = torch.full((), target.numel(), dtype=torch.long, device=x.device)
            if batch.gen_repa_pixels is not None:
                pred = self.repa_proj(mid.reshape(-1, mid.shape[-1])[latent_idx].view(n_gen, g, -1))
                with torch.no_grad():
                    ref = self.vision(batch.gen_repa_pixels)
                if ref.shape[1] != g:
                    raise ValueError(f"REPA needs SigLIP's grid ({ref.shape[1]} patches) to match the gen grid ({g} tokens)")
                cos = F.cosine_similarity(pred.float(), ref.float(), dim=-1)
                loss_sum["repa"] = (1 - cos).sum()
                count["repa"] = torch.full((), cos.numel(), dtype=torch.long, device=x.device)
            elif touch_all:
                loss_sum["repa"] = self._touch_repa(mid)
        elif touch_all:
            v = self.decode_velocity(hidden[:1, :1].expand(1, c.num_gen_tokens, -1), skip, t_emb)
            loss_sum["flow"] = 0.0 * v.float().sum()
            loss_sum["repa"] = self._touch_repa(mid)
        for name in LOSSES:
            loss_sum.setdefault(name, zero)
            count.setdefault(name, torch.zeros((), dtype=torch.long, device=x.device))
        return FlowLosses({n: loss_sum[n] for n in LOSSES}, {n: count[n] for n in LOSSES})

    def _touch_repa(self, mid: torch.Tensor) -> torch.Tensor:
        """REPA's modules as a real gen document runs them (the projector, then SigLIP without
        gradient for the target) on dummy input, scaled by 0: under ZeRO-3 every rank must run
        the same modules in the same order (each one gathers its parameters)."""
        pred = self.repa_proj(mid[:1, :1])
        side = self.config.vision.image_size
        with torch.no_grad():
            self.vision(torch.zeros(1, 3, side, side, device=mid.device, dtype=mid.dtype))
        return 0.0 * pred.float().sum()

    # ---- inference -------------------------------------------------------------------------
    # The same interface as JanusModel's (inference/understand.py runs on either family); the
    # cache and decoding are the shared LanguageModel's.
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int):
        """An empty `models.llm.KVCache` for `batch` rows of up to `max_len` positions."""
        return self.llm.new_cache(batch, max_len)

    def decode_step(self, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
        """Run new positions [B, T, H] through the LLM with the cache; returns hidden [B, T, H]."""
        return self.llm.decode_step(inputs_embeds, cache, self.config.attention)


class RepaProjector(nn.Module):
    """REPA's projector h_phi: LLM hidden -> hidden -> SiLU ... -> SigLIP width (3 linears)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)])

    def init_(self, gen: torch.Generator | None = None, gathered: Gathered = whole_params) -> None:
        """normal(0, 1/sqrt(fan_in)) weights, zero biases: outputs of order one. The REPA loss is a
        cosine, whose gradient scales as 1/|output|: at the LLM's 0.02 init the projector's
        outputs are tiny and its gradient dominated the first steps' global norm (~3000 of ~4500
        measured at janusflow_tiny), so clipping starved every other part."""
        with torch.no_grad():
            for layer in self.layers:
                with gathered([layer.weight, layer.bias]):
                    w = torch.randn(layer.weight.shape, generator=gen) / layer.weight.shape[1] ** 0.5
                    layer.weight.copy_(w.to(layer.weight.dtype))
                    layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(F.silu(x))
        return x


def _scatter_check(n_pos: int, values: torch.Tensor, mask_name: str, what: str) -> None:
    """`n_pos`: the mask's True entries, from the batch's host counts."""
    n_val = values.shape[0] * values.shape[1]
    if n_pos != n_val:
        raise ValueError(f"{mask_name} marks {n_pos} positions but {values.shape[0]} {what} give {n_val}")
