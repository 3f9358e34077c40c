"""Per-GPU memory estimate of a Janus-Pro or JanusFlow training configuration, and whether it fits.

    python -m janus_train.tools.memory_plan +recipe=janus_pro_7b parallel.nodes=32 \\
        parallel.gpus_per_node=8 parallel.zero_stage=3 [parallel.tp=2] [stage=2] [--device-mem-gib 40]
    python -m janus_train.tools.memory_plan +recipe=janusflow_1_3b --device-mem-gib 80

Arguments other than --flags are the training config's Hydra overrides (recipes/), so the plan
describes exactly what `launch/train.py` would run: model size, stage trainable set, ZeRO
stage, DP = nodes * gpus_per_node / tp, micro-batch rows, seq_len, dtype, attention backend
and activation checkpointing. Without stage=N every enabled stage is planned.

What is counted (bytes per GPU), and the assumptions, are in docs/performance.md ("## Memory"):
  parameters     working copies (bf16; fp32 with dtype=fp32), TP-split ones divided by tp, all
                 of them divided by dp under ZeRO-3
  gradients      of trainable parameters; divided by dp from ZeRO-2; plus DeepSpeed's fp32
                 gradient of its optimizer partition
  optimizer      fp32 master weights (bf16 only) + AdamW exp_avg + exp_avg_sq, divided by dp
                 (ZeRO >= 1); with train.ema_decay > 0 also the weight average's fp32 copy of the
                 trainable weights, always divided by dp (training/ema.py)
                 from ZeRO-1
  activations    tensors saved for backward by *our* implementation (counted tensor by tensor,
                 see `layer_activation_bytes`; JanusFlow's generation path per gen image,
                 `flow_activation_bytes`), for the chosen checkpointing, plus the largest
                 transient (the lm_head's softmax gradient, one recomputed block, or JanusFlow's
                 gradient-free SigLIP forward for the REPA target; for JanusFlow net of the
                 decoder and REPA activations backward has released before the head's turn)
  buffers        DeepSpeed's reduce / all-gather buckets, ZeRO-3 gathered parameters
  overhead       CUDA context, NCCL and allocator slack (--overhead-gib)
With finetune.mode=lora (peft's adapters, counted by injecting them into a meta model): the frozen
base is held once, in the run dtype, with no gradients or optimizer states; the adapters and
finetune.lora.modules_to_save are the trainable parameters (working copy + gradients + fp32
masters and AdamW moments). Activations are those of training the components the adapters sit
in (their layers' inputs are kept for the adapters), plus per adapted linear its rank-wide
intermediate and, with lora dropout, the dropped-out input and its mask. DeepSpeed's buckets
never hold more than the trainable parameters.
Peak = parameters + optimizer + buffers + overhead + max(activations + transient at the start of
backward, gradients + optimizer-step temporaries at the update).
Start-up peak = parameters + optimizer + overhead + the start-up transient: under ZeRO-3 (no TP,
no LoRA) parameters are created partitioned and each rank loads its slices, so nothing more than
one fp32 tensor (bf16 runs: a weight's exact value for its master copy); ZeRO-1/2 add the flat
copy of the trainable weights DeepSpeed makes; ZeRO-3 with TP or LoRA builds the model whole
first. The checkpoint is read through a memory map (host page cache, not device memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

from janus_train.models.janus.config import JanusConfig
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.models.lora import LoraSettings

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# DeepSpeed 0.19 ZeRO defaults (elements): the engine's generated config does not change them.
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000


@dataclass
class PlanSettings:
    """Everything the estimate depends on. Batch-composition fields left None take the
    memory worst case: every position supervised by the 102400-way lm_head *and* rows full of
    und images *and* (JanusFlow) rows full of gen documents at once (an upper bound; real rows
    cannot be all of these)."""

    model: JanusConfig | JanusFlowConfig
    trainable: list[str]
    zero_stage: int = 3
    dp: int = 1
    tp: int = 1
    micro_batch_rows: int = 1
    seq_len: int = 4096
    dtype: str = "bf16"  # bf16: DeepSpeed bf16 (fp32 masters); fp32: everything fp32
    recompute: str = "none"
    recompute_every: int = 2
    attention: str = "flash"
    engine: str = "deepspeed"  # deepspeed | torch (a plain loop with torch AdamW: CPU cross-checks)
    text_supervised: int | None = None  # lm_head positions per micro-batch
    gen_supervised: int = 0  # gen head positions per micro-batch
    gen_inputs: int = 0  # VQ-code input positions per micro-batch
    und_images: int | None = None  # und images per micro-batch
    # JanusFlow: gen documents (latent images) per micro-batch; None: rows full of the shortest
    # gen documents (BOS, time slot, latents: a CFG-dropped prompt).
    gen_images: int | None = None
    head_chunk_tokens: int | None = None  # chunked, recomputed head CE (parallel/chunked_loss.py)
    sdpa_by_document: bool = False  # CPU sdpa ran one call per document (models/attention.py)
    overhead_gib: float = 1.5
    # finetune.mode=lora: peft adapters (models/lora.py LoraSettings); `trainable` then lists the
    # components whose activations backward needs (those holding adapters, and modules_to_save).
    lora: LoraSettings | None = None
    ema: bool = False  # train.ema_decay > 0: an fp32 average of the trainable weights, split over dp

    def validate(self) -> "PlanSettings":
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} must be bf16 or fp32")
        if self.engine == "torch" and self.zero_stage:
            raise ValueError("engine=torch models a plain loop: zero_stage must be 0")
        if self.dp < 1 or self.tp < 1 or self.micro_batch_rows < 1 or self.seq_len < 1:
            raise ValueError(f"dp={self.dp}, tp={self.tp}, micro_batch_rows={self.micro_batch_rows}, seq_len={self.seq_len} must be >= 1")
        if self.recompute not in ("none", "full", "selective"):
            raise ValueError(f"recompute={self.recompute!r} is not one of none|full|selective")
        return self


@dataclass
class MemoryPlan:
    settings: dict
    params: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    buffers: float
    overhead: float
    peak: float
    device_mem: float | None
    fits: bool | None
    detail: dict[str, float] = field(default_factory=dict)
    startup: float = 0.0  # peak once the engine is built, before the first step


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


def param_counts(cfg: JanusConfig | JanusFlowConfig, trainable: list[str], tp: int, lora: LoraSettings | None = None) -> dict[str, float]:
    """Parameters held per GPU before ZeRO: trainable / frozen (by the model family's
    components), TP-split ones divided by tp. With `lora`: peft's adapters are injected (on the
    meta device) and train with the modules to save; everything else is frozen
    (`adapter` counts the adapters alone)."""
    import torch

    from janus_train.models.families import family_of_config
    from janus_train.parallel.tensor_parallel import tp_split_dim

    family = family_of_config(cfg)
    with torch.device("meta"):
        model = family.build(cfg)
        if lora is not None:
            from janus_train.models.lora import apply_lora

            apply_lora(model, lora)
    out = {"trainable": 0.0, "frozen": 0.0, "largest_trainable": 0.0, "largest_block": 0.0, "adapter": 0.0, "largest": 0.0}
    seen: set[int] = set()
    for comp in family.components:
        part = getattr(model, comp)  # a module, or a bare parameter (JanusFlow's und_begin)
        named = [(comp, part)] if isinstance(part, torch.nn.Parameter) else part.named_parameters(prefix=comp)
        for name, p in named:
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel() / (tp if tp_split_dim(name) is not None else 1)
            if lora is None:
                key = "trainable" if comp in trainable else "frozen"
            else:
                adapter = ".lora_" in name
                out["adapter"] += n if adapter else 0.0
                key = "trainable" if adapter or comp in lora.modules_to_save else "frozen"
            out[key] += n
            out["largest"] = max(out["largest"], n)
            if key == "trainable":
                out["largest_trainable"] = max(out["largest_trainable"], n)
    block = model.llm.layers[0]
    out["largest_block"] = sum(p.numel() / (tp if tp_split_dim(f"llm.layers.0.{n}") is not None else 1) for n, p in block.named_parameters())
    return out


# ---------------------------------------------------------------------------------------
# Activations: the tensors our model saves for backward, per token
# ---------------------------------------------------------------------------------------


def layer_activation_bytes(cfg: JanusConfig | JanusFlowConfig, s: PlanSettings, weights_train: bool) -> dict[str, float]:
    """Bytes saved per token by one LLM block (no checkpointing), by part.

    RMSNorm (model.py) computes in fp32: it keeps its fp32 input (the bf16 input cast up, or
    the fp32 input itself) and the normalised value in the working dtype; the q/k/v (gate/up)
    projections keep the norm's output when their weights train. Attention keeps q, k, v and
    its output (flash-attn, and torch's CPU SDPA kernel, store the output in the layout o_proj
    reads, so no second copy); SDPA also keeps the float version of the boolean mask per layer
    (seq_len values per token); eager keeps the fp32 softmax (and its working-dtype copy).
    SwiGLU keeps gate, silu(gate), up and their product (the last only for a training
    down_proj). Heads are split over TP; norm inputs/outputs are whole on every TP rank (no
    sequence parallelism).
    """
    b = DTYPE_BYTES[s.dtype]
    llm = cfg.llm
    h, i, tp = llm.hidden_size, llm.intermediate_size, s.tp
    q_w, kv_w = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    norm = (4 + b) * h  # fp32 input + normalised value
    normed = b * h if weights_train else 0.0
    if s.attention in ("flash", "flex"):
        core = b * (2 * q_w + 2 * kv_w) / tp
    elif s.attention == "sdpa" and s.sdpa_by_document:
        # CPU, one causal call per document: q, k, v, each document's output, and the
        # concatenated output re-laid out for o_proj; no mask.
        core = b * 5 * q_w / tp
    elif s.attention == "sdpa":
        # The GQA repeat happens before SDPA on this path: k, v are stored q-wide.
        core = b * 4 * q_w / tp + b * s.seq_len
    else:  # eager
        core = b * 4 * q_w / tp + (4 + (b if b == 2 else 0)) * (llm.num_heads / tp) * s.seq_len
    mlp = b * (4 if weights_train else 3) * i / tp
    out = {"attn_norm": norm, "attn_in": normed, "attention": core, "mlp_norm": norm, "mlp_in": normed, "mlp": mlp}
    if s.lora is not None:
        out["lora"] = lora_layer_bytes(cfg, s)
    return out


def lora_layer_bytes(cfg: JanusConfig | JanusFlowConfig, s: PlanSettings) -> float:
    """Bytes per token the adapters of one LLM block save beyond a block whose weights train
    (whose linears' inputs are counted already): each adapted linear's rank-wide intermediate
    (lora_B's input) and, with lora dropout, the dropped-out input (lora_A's) and its mask."""
    import re

    from janus_train.models.lora import target_regex

    llm = cfg.llm
    h, i = llm.hidden_size, llm.intermediate_size
    widths = {"attn.q_proj": h, "attn.k_proj": h, "attn.v_proj": h, "attn.o_proj": llm.num_heads * llm.head_dim,
              "mlp.gate_proj": h, "mlp.up_proj": h, "mlp.down_proj": i}
    rx = re.compile(target_regex(s.lora.target_modules))
    b = DTYPE_BYTES[s.dtype]
    total = 0.0
    for name, width in widths.items():
        if rx.fullmatch(f"llm.layers.0.{name}"):
            total += b * s.lora.rank + ((b + 1) * width if s.lora.dropout > 0 else 0.0)
    return total


def activation_bytes(cfg: JanusConfig | JanusFlowConfig, s: PlanSettings) -> tuple[dict[str, float], float]:
    """(saved activation bytes by part, largest transient on top of them) for one micro-batch.
    The LLM, the lm_head and the und path are the same for both families; Janus-Pro adds its
    gen head and aligner, JanusFlow its generation path (`flow_activation_bytes`)."""
    from janus_train.models.families import family_of_config

    family = family_of_config(cfg)
    flow = family.gen_kind == "flow"
    b = DTYPE_BYTES[s.dtype]
    t = set(s.trainable)
    tokens = s.micro_batch_rows * s.seq_len
    h, L, tp = cfg.llm.hidden_size, cfg.llm.num_layers, s.tp
    through_llm = family.grads_flow_into_llm(s.trainable) or "llm" in t
    per_layer = layer_activation_bytes(cfg, s, "llm" in t)
    none_layer = sum(per_layer.values())
    out: dict[str, float] = {}
    recompute = 0.0
    if through_llm:
        if s.recompute == "none":
            layers = L * none_layer
        elif s.recompute == "full":
            layers = L * b * h  # each block keeps only its input
            recompute = none_layer
        elif s.recompute_every == 1:  # selective, attention half of every block
            attn_part = per_layer["attn_norm"] + per_layer["attn_in"] + per_layer["attention"]
            layers = L * (none_layer - attn_part + b * h)
            recompute = attn_part
        else:  # selective: every Nth block in full
            n_ckpt = len(range(0, L, s.recompute_every))
            layers = n_ckpt * b * h + (L - n_ckpt) * none_layer
            recompute = none_layer
        out["llm_blocks"] = layers * tokens
        out["llm_final_norm"] = (4 + b) * h * tokens
        # RoPE cos/sin (shared by all blocks), the packed-attention mask (shared).
        dense_mask = s.attention == "eager" or (s.attention == "sdpa" and not s.sdpa_by_document)
        out["rope_and_mask"] = 2 * b * cfg.llm.head_dim * tokens + (s.micro_batch_rows * s.seq_len**2 if dense_mask else 0)
    # Heads, on supervised positions only (model.py). CE keeps the fp32 log-softmax; the
    # projection keeps its gathered input when its weight trains. JanusFlow has no gen head.
    text_sup = tokens if s.text_supervised is None else s.text_supervised
    gen_sup = 0 if flow else s.gen_supervised
    vocab = cfg.llm.vocab_size / tp
    codebook = 0.0 if flow else cfg.vq.codebook_size / tp
    # Backward of a head: the fp32 softmax gradient and the incoming gradient (+ the
    # working-dtype cast of the logits' gradient) next to the kept fp32 log-softmax.
    grad_bytes = 8 + (b if b == 2 else 0)
    if s.head_chunk_tokens:
        # Chunked + recomputed: only the chunk inputs stay; backward rebuilds one chunk's
        # log-softmax (4 bytes per logit) and its gradients at a time.
        c = s.head_chunk_tokens
        out["lm_head"] = text_sup * b * h
        if not flow:
            out["gen_head"] = gen_sup * b * h
        head_transient = max(min(text_sup, c) * vocab, min(gen_sup, c) * codebook) * (4 + grad_bytes)
    else:
        head_in = b * h if "lm_head" in t else 0.0
        out["lm_head"] = text_sup * (head_in + 4 * vocab)
        if not flow:
            g_in = (b * h + 2 * b * cfg.gen_head_hidden) if "gen_head" in t else 0.0
            out["gen_head"] = gen_sup * (g_in + 4 * codebook)
        head_transient = max(text_sup * vocab, gen_sup * codebook) * grad_bytes
    if not flow and "gen_aligner" in t:
        out["gen_aligner"] = s.gen_inputs * 2 * b * h
    images = s.und_images
    if images is None:
        # JanusFlow's und image also fills its begin-embedding position.
        positions = cfg.num_und_tokens if flow else cfg.num_image_tokens
        images = s.micro_batch_rows * max(s.seq_len // (positions + 8), 1 if s.seq_len >= positions else 0)
    patches = images * cfg.num_image_tokens
    v = cfg.vision
    if "vision" in t:
        inner = int(v.hidden_size * v.mlp_ratio)
        # Per ViT block and patch: LayerNorm in/out x2, q, k, v, attention output, fc1 out, GELU out.
        per_block = b * (4 * v.hidden_size + 4 * v.hidden_size + 2 * inner)
        out["vision"] = patches * (v.num_layers * per_block + 2 * b * v.hidden_size)
    if "und_aligner" in t:
        # Each linear keeps its input, each GELU its input (Janus-Pro: 2 layers, JanusFlow: 1).
        out["und_aligner"] = patches * b * (v.hidden_size + 2 * h * (v.aligner_depth - 1))
    transient = max(head_transient, recompute * tokens)
    if flow:
        gen_parts, siglip_transient = flow_activation_bytes(cfg, s, through_llm)
        out.update(gen_parts)
        # Autograd runs backward nodes in reverse creation order: the decoder's and REPA's
        # (built after the lm_head's loss) run, and release what they kept, before the head's
        # backward and the LLM's recomputation. The transient is net of that.
        released = sum(gen_parts.get(k, 0.0) for k in ("gen_dec_norm", "gen_decoder", "repa"))
        transient = max(transient - released, siglip_transient, 0.0)
    return out, transient


def gen_images_per_micro_batch(cfg: JanusFlowConfig, s: PlanSettings) -> int:
    """JanusFlow gen documents in one micro-batch: `s.gen_images`, or rows full of the shortest
    ones (BOS, time slot, G latent slots: a CFG-dropped prompt)."""
    if s.gen_images is not None:
        return s.gen_images
    return s.micro_batch_rows * (s.seq_len // (cfg.num_gen_tokens + 2))


def convnext_block_bytes(channels: int, ffn_factor: int, b: int, weights_train: bool) -> float:
    """Bytes one ConvNeXt block (models/janusflow/uvit.py) saves per grid position.

    The depthwise conv keeps its input; RMSNorm its fp32 input and normalised value; the first
    linear a contiguous copy of the (channels-last view of the) normed input; GELU its input; the
    GRN its input (GELU's output, one tensor for its norm and its scale); the second linear the
    GRN output; the time modulation the residual sum. The linears' inputs only when the block's
    weights train.
    """
    c, inner = channels, channels * ffn_factor
    kept = b * c + (4 + b) * c + 2 * b * inner + b * c
    if weights_train:
        kept += b * c + b * inner
    return kept


def flow_activation_bytes(cfg: JanusFlowConfig, s: PlanSettings, through_llm: bool) -> tuple[dict[str, float], float]:
    """(saved bytes by part, transient) of JanusFlow's generation path for one micro-batch,
    per gen image (`gen_images_per_micro_batch`) of G latent tokens on a g x g grid.

      gen_encoder      the patchify conv's input (z_t), the time-embedding MLP, and
                       `flow.encoder_blocks` ConvNeXt blocks at `flow.width` channels
                       (`convnext_block_bytes`) per grid position; only when it trains (its
                       input is data)
      gen_enc_aligner  its input (a copy of the encoder features as tokens), when it trains
      gen_dec_norm     RMSNorm of the LLM's outputs at the latent positions (fp32 input and
                       normalised value) + gen_dec_aligner's input when that trains
      gen_decoder      the input RMSNorm, `flow.decoder_blocks` ConvNeXt blocks at 2 x width
                       (features + the encoder's skip), the output RMSNorm and 1x1 conv input,
                       and the flow loss's fp32 difference
      repa             the projector's input (block `flow.repa_layer`'s outputs at the latent
                       positions), its hidden activations (SiLU in/out, 2 x 2 x repa_hidden),
                       and the cosine's fp32 prediction and normalised target (8 bytes x
                       SigLIP width)
    Backward reaches the decoder and REPA whenever something at or before the LLM trains, or
    they do. SigLIP's forward for the REPA target runs without grad: nothing kept, but one
    block's working set per gen image while it runs (the residual, its LayerNorm, fc1 and GELU
    outputs): the transient returned. Per-image time-embedding terms are counted; index and
    mask tensors (bytes per position) are not.
    """
    images = gen_images_per_micro_batch(cfg, s)
    if images <= 0:
        return {}, 0.0
    b = DTYPE_BYTES[s.dtype]
    t = set(s.trainable)
    fl, h = cfg.flow, cfg.llm.hidden_size
    g_tokens, w = cfg.num_gen_tokens, fl.width
    latent = fl.latent_channels * cfg.latent_size**2  # elements per latent image
    out: dict[str, float] = {}
    enc = "gen_encoder" in t
    if enc:
        per_pos = fl.encoder_blocks * convnext_block_bytes(w, fl.ffn_factor, b, True)
        # z_t (the patchify conv's input); the time MLP's inputs (linear, SiLU, linear); its
        # output, kept by every block's SiLU, and each block's SiLU output.
        per_image = b * latent + b * (w + 2 * h) + b * h * (1 + fl.encoder_blocks)
        out["gen_encoder"] = images * (g_tokens * per_pos + per_image)
    if "gen_enc_aligner" in t:
        out["gen_enc_aligner"] = images * g_tokens * b * w
    dec_in = through_llm or "gen_dec_norm" in t
    dec_norm = ((4 + b) * h if dec_in else 0) + (b * h if "gen_dec_aligner" in t else 0)
    if dec_norm:
        out["gen_dec_norm"] = images * g_tokens * dec_norm
    if dec_in or enc or "gen_dec_aligner" in t or "gen_decoder" in t:
        dec_train = "gen_decoder" in t
        per_pos = (4 + b) * w + fl.decoder_blocks * convnext_block_bytes(2 * w, fl.ffn_factor, b, dec_train)
        per_pos += (4 + b) * 2 * w + b * 2 * w  # output RMSNorm, the 1x1 conv's input
        per_image = 4 * latent + (b * h * fl.decoder_blocks if dec_train else 0)
        out["gen_decoder"] = images * (g_tokens * per_pos + per_image)
    transient = 0.0
    if fl.repa_weight > 0:
        v = cfg.vision
        if through_llm or "repa_proj" in t:
            rh = fl.repa_hidden
            proj = b * (h + 4 * rh) if "repa_proj" in t else 2 * b * rh
            out["repa"] = images * g_tokens * (proj + 8 * v.hidden_size)
        inner = int(v.hidden_size * v.mlp_ratio)
        transient = images * cfg.num_image_tokens * b * (3 * v.hidden_size + 2 * inner)
    return out, transient


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def plan_memory(s: PlanSettings, device_mem_gib: float | None = None) -> MemoryPlan:
    s.validate()
    cfg = s.model
    b = DTYPE_BYTES[s.dtype]
    counts = param_counts(cfg, s.trainable, s.tp, s.lora)
    n_t, n_f = counts["trainable"], counts["frozen"]
    dp, z = s.dp, s.zero_stage
    detail: dict[str, float] = {"trainable_params_per_gpu_before_zero": n_t, "frozen_params_per_gpu_before_zero": n_f}
    if s.lora is not None:
        detail["adapter_params"] = counts["adapter"]

    params = b * (n_t + n_f) / (dp if z == 3 else 1)
    if s.engine == "torch":
        grads = 4.0 * n_t if s.dtype == "fp32" else (b + 4.0) * n_t
        optimizer = 8.0 * n_t + (4.0 * n_t if s.dtype == "bf16" else 0.0)
        step_tmp = 2 * 4.0 * counts["largest_trainable"]
    else:
        work_grads = b * n_t / (dp if z >= 2 else 1)
        fp32_grad_part = 4.0 * n_t / (dp if z >= 1 else 1)  # DeepSpeed's fp32 grad of its partition
        grads = work_grads + fp32_grad_part
        optimizer = 12.0 * n_t / (dp if z >= 1 else 1)  # fp32 master + exp_avg + exp_avg_sq
        step_tmp = 0.0
    if s.ema:
        detail["weight_average"] = 4.0 * n_t / dp
        optimizer += detail["weight_average"]
        detail["grads_working_dtype"] = work_grads
        detail["grads_fp32_partition"] = fp32_grad_part

    buffers = 0.0
    # A LoRA run's buckets fill with its few trainable parameters only.
    reduce_bucket = min(DS_REDUCE_BUCKET, n_t) if s.lora is not None else DS_REDUCE_BUCKET
    allgather_bucket = min(DS_ALLGATHER_BUCKET, n_t) if s.lora is not None else DS_ALLGATHER_BUCKET
    if s.engine == "deepspeed":
        if z in (1, 2):
            buffers += b * allgather_bucket + (b * reduce_bucket if z == 2 else 0.0)
        elif z == 3:
            # The block being computed and the prefetched next one, whole (TP shard), and the
            # reduce-scatter bucket; DeepSpeed caps live gathered parameters.
            gathered = min(2 * counts["largest_block"] + DS_PREFETCH_BUCKET, DS_MAX_LIVE_PARAMETERS)
            buffers += b * gathered + b * reduce_bucket
    overhead = s.overhead_gib * GIB

    parts, transient = activation_bytes(cfg, s)
    acts = sum(parts.values())
    detail.update({f"act_{k}": v for k, v in parts.items()})
    if isinstance(cfg, JanusFlowConfig):
        detail["gen_images_per_micro_batch"] = gen_images_per_micro_batch(cfg, s)
    peak = params + optimizer + buffers + overhead + max(acts + transient, grads + step_tmp)
    # Start-up (training/trainer.py _build_model): the model is cast before it gets memory, and
    # a bf16 run puts each trainable weight's exact fp32 value into its master copy one tensor
    # at a time. ZeRO-3 without TP or LoRA creates parameters partitioned and loads slices
    # (parallel/zero3_init.py); ZeRO-1/2 flatten the trainable weights into one buffer while the
    # originals still exist.
    partitioned = s.engine == "deepspeed" and z == 3 and s.tp == 1 and s.lora is None
    startup_tmp = 4.0 * counts["largest"] if s.dtype == "bf16" else 0.0
    if s.engine == "deepspeed" and z in (1, 2):
        startup_tmp += b * n_t
    elif z == 3 and not partitioned:
        startup_tmp += b * (n_t + n_f)  # built whole, then partitioned by the engine
    detail["startup_transient"] = startup_tmp
    startup = params + optimizer + overhead + startup_tmp
    device = device_mem_gib * GIB if device_mem_gib else None
    return MemoryPlan(
        settings=_settings_summary(s),
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=acts,
        transient=transient,
        buffers=buffers,
        overhead=overhead,
        peak=peak,
        startup=startup,
        device_mem=device,
        fits=(peak <= device) if device else None,
        detail=detail,
    )


def _settings_summary(s: PlanSettings) -> dict:
    d = asdict(s)
    d["model"] = s.model.name
    return d


def lora_activation_components(family, lora: "LoraSettings", model) -> list[str]:
    """The components a LoRA run's backward reaches as if they trained: those holding adapters
    (their inputs are kept for the adapters) and the modules to save."""
    from janus_train.models.lora import matched_modules

    tops = {name.split(".")[0] for t in lora.target_modules for name in matched_modules(model, t)}
    return [c for c in family.components if c in tops or c in lora.modules_to_save]


# ---------------------------------------------------------------------------------------
# From the training config
# ---------------------------------------------------------------------------------------


def settings_from_config(run, stage_index: int | None = None) -> list[tuple[str, PlanSettings]]:
    """One PlanSettings per stage to plan (the given one, or every enabled stage) of a
    validated training config (`training.config.RunConfig`)."""
    from janus_train.parallel.tensor_parallel import check_tp_divisibility

    m, p = run.model, run.parallel
    model = m.model_config_for()
    world = p.nodes * p.gpus_per_node
    if world % p.tp:
        raise ValueError(f"parallel.tp={p.tp} does not divide parallel.nodes*gpus_per_node={world}")
    if p.tp > 1:
        check_tp_divisibility(model, p.tp)
    dtype = "bf16" if p.dtype == "auto" else p.dtype
    stages = run.enabled_stages()
    lora = run.finetune.lora.settings() if run.finetune.is_lora else None
    lora_trainable = None
    if lora is not None:
        import torch

        family = run.model.family
        with torch.device("meta"):
            lora_trainable = lora_activation_components(family, lora, family.build(model))
    wanted = stage_index if stage_index is not None else run.stage
    if wanted is not None:
        stages = [st for st in stages if st.index == wanted]
        if not stages:
            raise ValueError(f"stage={wanted} is not an enabled stage")
    return [
        (
            st.name,
            PlanSettings(
                model=model,
                trainable=list(st.trainable) if lora is None else list(lora_trainable),
                zero_stage=p.zero_stage,
                dp=world // p.tp,
                tp=p.tp,
                micro_batch_rows=run.train.micro_batch_rows,
                seq_len=run.data.seq_len,
                dtype=dtype,
                recompute=m.recompute,
                recompute_every=m.recompute_every,
                attention=m.attention,
                head_chunk_tokens=m.head_chunk_tokens,
                lora=lora,
                ema=run.train.ema_decay > 0,
            ),
        )
        for st in stages
    ]


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def format_plan(name: str, plan: MemoryPlan) -> str:
    s = plan.settings
    lines = [
        f"{name}: {s['model']}  " + ("LoRA adapters in" if s.get("lora") else "trainable") + f"={','.join(s['trainable'])}",
        f"  ZeRO-{s['zero_stage']}  dp={s['dp']}  tp={s['tp']}  micro_batch_rows={s['micro_batch_rows']}  seq_len={s['seq_len']}  "
        f"dtype={s['dtype']}  attention={s['attention']}  recompute={s['recompute']}"
        + (f" (every {s['recompute_every']})" if s["recompute"] == "selective" else "")
        + (f"  head_chunk_tokens={s['head_chunk_tokens']}" if s["head_chunk_tokens"] else ""),
    ]
    if s.get("lora"):
        lo = s["lora"]
        lines.append(f"  LoRA: rank={lo['rank']} alpha={lo['alpha']:g} dropout={lo['dropout']:g} targets={','.join(lo['target_modules'])}"
                     + (f" modules_to_save={','.join(lo['modules_to_save'])}" if lo["modules_to_save"] else "")
                     + f"  adapter parameters={plan.detail['adapter_params']:,.0f}"
                     + f"  trainable={plan.detail['trainable_params_per_gpu_before_zero']:,.0f}"
                     + f"  frozen base={plan.detail['frozen_params_per_gpu_before_zero']:,.0f} ({s['dtype']}, no grads/optimizer states)")
    if "gen_images_per_micro_batch" in plan.detail:
        lines.append(f"  gen images per micro-batch={plan.detail['gen_images_per_micro_batch']:g}"
                     + ("" if s["gen_images"] is not None else " (worst case: rows full of gen documents)"))
    rows = [
        ("parameters", plan.params),
        ("gradients", plan.grads),
        ("optimizer states", plan.optimizer),
        ("activations (saved)", plan.activations),
        ("backward transient", plan.transient),
        ("DeepSpeed buffers", plan.buffers),
        ("runtime overhead", plan.overhead),
        ("peak per GPU", plan.peak),
        ("start-up peak", plan.startup),
    ]
    for label, value in rows:
        lines.append(f"  {label:<22}{value / GIB:9.2f} GiB")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  => {verdict} in {plan.device_mem / GIB:g} GiB (headroom {(plan.device_mem - plan.peak) / GIB:.2f} GiB)")
    smallest = next((g for g in COMMON_GPU_GIB if plan.peak <= g * GIB), None)
    lines.append(f"  smallest common GPU it fits: {f'{smallest:g} GiB' if smallest else 'none'} (of {', '.join(f'{g:g}' for g in COMMON_GPU_GIB)} GiB)")
    return "\n".join(lines)


# Device memories of common training GPUs (RTX 4080 16, RTX 4090/A10 24, A100 40, L40S/A6000 48,
# A100/H100 80, H200 141), for the "smallest common GPU" line.
COMMON_GPU_GIB = (16, 24, 40, 48, 80, 141)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.memory_plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="training-config overrides, e.g. +recipe=janus_pro_7b parallel.tp=2 stage=2")
    p.add_argument("--device-mem-gib", type=float, default=40.0, help="device memory to fit in (default 40: A100-40GB)")
    p.add_argument("--overhead-gib", type=float, default=1.5, help="CUDA context + NCCL + allocator slack (default 1.5)")
    p.add_argument("--head-chunk-tokens", type=int, default=None,
                   help="override model.head_chunk_tokens (the chunked head loss, janus_train/parallel/chunked_loss.py)")
    p.add_argument("--json", action="store_true", help="one JSON object per stage instead of a table")
    args = p.parse_args(argv)
    from janus_train.training.config import ConfigError, load_config, validate_config

    try:
        run = validate_config(load_config(args.overrides), check_paths=False, complete=False)
        plans = settings_from_config(run)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    all_fit = True
    for name, settings in plans:
        settings.overhead_gib = args.overhead_gib
        if args.head_chunk_tokens is not None:
            settings.head_chunk_tokens = args.head_chunk_tokens or None
        plan = plan_memory(settings, args.device_mem_gib)
        all_fit &= bool(plan.fits)
        if args.json:
            print(json.dumps({"stage": name, **{k: v for k, v in asdict(plan).items()}}))
        else:
            print(format_plan(name, plan))
    return 0 if all_fit else 1


if __name__ == "__main__":
    sys.exit(main())
