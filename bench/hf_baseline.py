"""The baseline a user has today: transformers' `JanusForConditionalGeneration` trained with a
plain PyTorch loop on unpacked, right-padded samples.

One step = one padded micro-batch per task present (und, text, gen), each followed by its
backward (gradient accumulation), then AdamW:
  und / text  model(input_ids, pixel_values?, attention_mask, labels).loss   (HF's own CE over
              the full 102400-way lm_head at every position)
  gen         inputs_embeds = text embeddings with the code positions replaced by
              prepare_embeddings_for_image_generation(codes); language_model(...); then
              model.model.generation_head over every position and CE on the code targets
The per-task mean losses are weighted by their token counts so the step optimises the same
global token mean as ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from janus_train.contracts.synthetic import PAD_ID, image_token_id
from janus_train.contracts.batch import IGNORE_INDEX, TASKS, Doc
from janus_train.models.janus import config_formats, keys
from janus_train.models.janus.config import JanusConfig


def build_hf_model(cfg: JanusConfig, native_sd: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, attn_impl: str = "sdpa"):
    """transformers' Janus holding exactly our weights."""
    from transformers import JanusConfig as HFJanusConfig
    from transformers import JanusForConditionalGeneration

    cfg = JanusConfig.from_dict(cfg.to_dict())
    cfg.image_token_id = image_token_id(cfg)
    hf_cfg = HFJanusConfig(**config_formats.config_to_hf(cfg))
    hf_cfg._attn_implementation = attn_impl
    # Built for real on the target device (random init, then overwritten): non-persistent
    # buffers (rotary inv_freq, vision position ids) come out right without special cases.
    with torch.device(device):
        model = JanusForConditionalGeneration(hf_cfg)
    model.load_state_dict(keys.from_native(native_sd, cfg, "hf"), strict=True)
    model.model.vqmodel.requires_grad_(False)
    return model.to(dtype).train()


@dataclass
class PaddedBatch:
    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # shifted like ours: labels[i] is predicted from position i
    gen_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    supervised: int


def padded_task_batches(docs: list[Doc], device: torch.device, float_dtype: torch.dtype) -> list[PaddedBatch]:
    """One right-padded batch per task, padded to that task's longest document."""
    out = []
    for task in ("und", "text", "gen"):
        group = [d for d in docs if TASKS[d.task] == task]
        if not group:
            continue
        n, s = len(group), max(len(d) for d in group)
        ids = torch.full((n, s), PAD_ID, dtype=torch.long)
        mask = torch.zeros((n, s), dtype=torch.long)
        labels = torch.full((n, s), IGNORE_INDEX, dtype=torch.long)
        gen = torch.zeros((n, s), dtype=torch.bool)
        for i, d in enumerate(group):
            k = len(d)
            ids[i, :k] = torch.from_numpy(d.ids.astype("int64"))
            mask[i, :k] = 1
            # Shifted like ours: labels[j] is the target predicted from position j.
            row = torch.from_numpy(d.ids[1:].astype("int64"))
            labels[i, : k - 1] = row.masked_fill(~torch.from_numpy(d.target[1:]), IGNORE_INDEX)
            gen[i, d.gen_start : k] = True
        images = [d.pixels for d in group if d.pixels is not None]
        pixels = torch.cat(images).to(device, float_dtype) if images else None
        out.append(PaddedBatch(task, ids.to(device), mask.to(device), labels.to(device), gen.to(device), pixels,
                               int((labels != IGNORE_INDEX).sum())))
    return out


def hf_task_loss(model, b: PaddedBatch) -> torch.Tensor:
    """Mean CE over the batch's supervised tokens, computed the way a user would with HF."""
    if b.task in ("und", "text"):
        # HF shifts labels itself: its labels[i] is the token at position i.
        hf_labels = torch.cat([torch.full_like(b.labels[:, :1], IGNORE_INDEX), b.labels[:, :-1]], dim=1)
        out = model(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask, labels=hf_labels)
        return out.loss
    text_ids = b.input_ids.masked_fill(b.gen_mask, 0)
    emb = model.get_input_embeddings()(text_ids)
    code_emb = model.prepare_embeddings_for_image_generation(b.input_ids[b.gen_mask])
    emb = emb.masked_scatter(b.gen_mask[..., None], code_emb.to(emb.dtype))
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=b.attention_mask).last_hidden_state
    logits = model.model.generation_head(hidden)
    return F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX)


def hf_train_step(model, optimizer, batches: list[PaddedBatch], clip: float = 1.0) -> float:
    total = sum(b.supervised for b in batches)
    loss_value = 0.0
    for b in batches:
        loss = hf_task_loss(model, b) * (b.supervised / total)
        loss.backward()
        loss_value += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value
