"""Tensor parallelism for `JanusModel` with megatron-core, applied from outside the model.

    mpu = init_tensor_parallel(tp_size)        # after torch.distributed.init_process_group
    model = apply_tensor_parallel(model, mpu)   # in place; weights sliced from the dense model
    engine = deepspeed.initialize(model=model, ..., mpu=mpu)   # ZeRO shards over DP only

What is split (over the tensor-parallel group of `tp` ranks):
  LLM attention  q/k/v_proj -> ColumnParallelLinear (heads split), o_proj -> RowParallelLinear
  LLM MLP        gate/up_proj -> ColumnParallelLinear, down_proj -> RowParallelLinear
  embed_tokens   VocabParallelEmbedding (vocabulary rows split)
  lm_head        ColumnParallelLinear over the vocabulary + vocab_parallel_cross_entropy
  gen_head.fc2   ColumnParallelLinear over the VQ codebook + vocab_parallel_cross_entropy
Replicated on every TP rank: RMSNorms, SigLIP, und/gen aligners, gen_embed, gen_head.fc1, VQ.
Replicated parameters get identical gradients on every TP rank without extra communication:
each is used on full (all-reduced) activations, and megatron's column-parallel layers
all-reduce the input gradient in backward.

Every TP rank of a data-parallel slot must see the same batch (shard data by DP rank).
Checkpoints stay whole: `gather_tp_param` / `slice_tp_param` convert between a parameter's
whole tensor and this rank's shard, by TP_PLAN (checkpoint/consolidate.py uses them), so any
TP size reads any other's checkpoints.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from janus_train.models.janus.model import GenHead, JanusModel

# Parameters split by TP carry megatron's attributes: tensor_model_parallel=True and
# partition_dim (0 = output rows / vocabulary rows, 1 = input columns).
_TP_ATTR = "tensor_model_parallel"

# The split, by native parameter name -> the dimension split over TP ranks. Every other
# parameter is replicated. `apply_tensor_parallel` checks the model it builds against this
# table; the checkpoint code (gather_tp_param / slice_tp_param) and the memory plan read it.
TP_PLAN: tuple[tuple[str, int], ...] = (
    (r"llm\.embed_tokens\.weight", 0),
    (r"llm\.layers\.\d+\.attn\.[qkv]_proj\.weight", 0),
    (r"llm\.layers\.\d+\.attn\.o_proj\.weight", 1),
    (r"llm\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", 0),
    (r"llm\.layers\.\d+\.mlp\.down_proj\.weight", 1),
    (r"lm_head\.weight", 0),
    (r"gen_head\.fc2\.(weight|bias)", 0),
)


def tp_split_dim(name: str) -> int | None:
    """The dimension TP splits native parameter `name` along, or None if it is replicated."""
    for pattern, dim in TP_PLAN:
        if re.fullmatch(pattern, name):
            return dim
    return None


# ---------------------------------------------------------------------------------------
# Process groups, in DeepSpeed's mpu vocabulary
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelMPU:
    """megatron-core's TP / DP groups under the names DeepSpeed looks up on its `mpu`.

    DeepSpeed reduces and partitions (ZeRO) over `get_data_parallel_group()` and counts
    TP-split parameters once per TP group when it computes the gradient norm.
    """

    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: object
    dp_group: object

    # Old (Megatron-LM 1.x) names, used by most of DeepSpeed.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    # Current names, preferred by deepspeed.utils.bwc when present.
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group

    # No pipeline parallelism.
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def init_tensor_parallel(tp_size: int, timeout_minutes: float | None = None) -> ParallelMPU:
    """Create megatron-core's process groups for `tp_size`-way TP (DP = world / tp_size).

    torch.distributed must already be initialised (gloo on CPU, nccl on GPU). Calling it again
    with the same size returns the same groups; a different size raises. Adjacent global ranks
    form a TP group (megatron's default order), so TP stays inside a node when
    tp_size <= GPUs per node.
    """
    from megatron.core import parallel_state

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_tensor_parallel: torch.distributed is not initialised (call init_process_group first)")
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"parallel.tp={tp_size} must be >= 1 and divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tp_size:
            raise RuntimeError(f"tensor parallelism is already initialised with tp={current}, asked for tp={tp_size}")
    else:
        # No extra gloo groups: megatron only needs them for its own distributed optimizer.
        kwargs = {} if timeout_minutes is None else {"distributed_timeout_minutes": max(1, int(round(timeout_minutes)))}
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, create_gloo_process_groups=False, **kwargs)
    return ParallelMPU(
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def destroy_tensor_parallel() -> None:
    """Drop megatron-core's groups (before destroy_process_group, or to re-init at another size)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


# ---------------------------------------------------------------------------------------
# Parallel layers: megatron-core's, returning a tensor like nn.Linear so model code is unchanged
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _layers() -> SimpleNamespace:
    """megatron-core's parallel layers, adapted to nn.Linear's call convention.

    Built on first use: importing megatron-core takes ~4 s, and dense runs never need it.
    The subclasses keep megatron's parameter names (`weight`, `bias`), so a TP model's
    state_dict has the dense model's keys (with TP-sized shards) plus megatron's empty
    `_extra_state` entries, which `full_state_dict` drops.
    """
    from megatron.core import tensor_parallel as mtp

    class ColumnParallel(mtp.ColumnParallelLinear):
        """Output features split over TP ranks; returns this rank's slice [..., out/tp]."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            out, _ = super().forward(x)
            return out

    class RowParallel(mtp.RowParallelLinear):
        """Input features split over TP ranks; returns the all-reduced full output."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            out, _ = super().forward(x)
            return out

    class VocabParallelHead(ColumnParallel):
        """A head whose vocabulary is split over TP ranks (lm_head, gen_head.fc2).

        `per_token_cross_entropy` (the model's hook) takes CE from the local logit slice with
        megatron's `vocab_parallel_cross_entropy`: full [tokens, vocab] logits never exist.
        `forward` returns full logits (evaluation, parity checks, `touch_all`).
        """

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
            local = super().forward(x)
            if labels is not None:
                # The CE kernel works in fp32 and needs contiguous inputs.
                return mtp.vocab_parallel_cross_entropy(local.float().contiguous(), labels.contiguous())
            # megatron's all-gather helper allocates its buffer on CUDA; placing the slice in a
            # zero tensor and using megatron's (differentiable) all-reduce runs on CPU too.
            start = self.output_size_per_partition * dist.get_rank(group=self.tp_group)
            padded = F.pad(local, (start, self.output_size - start - local.shape[-1]))
            return mtp.reduce_from_tensor_model_parallel_region(padded, group=self.tp_group)

        def per_token_cross_entropy(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # Through __call__, so module hooks run (ZeRO-3 gathers the weight in one).
            return self(x, labels=labels)

    return SimpleNamespace(
        ColumnParallel=ColumnParallel,
        RowParallel=RowParallel,
        VocabParallelHead=VocabParallelHead,
        VocabParallelEmbedding=mtp.VocabParallelEmbedding,
    )


class TPGenHead(GenHead):
    """The gen head under TP: fc1 replicated, fc2 split over the VQ codebook."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Module):
        nn.Module.__init__(self)
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits, or with `labels` the per-token CE from the codebook slices."""
        return self.fc2(F.gelu(self.fc1(hidden)), labels=labels)

    def per_token_cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Through __call__, so module hooks run (ZeRO-3 gathers fc1/fc2 in theirs).
        return self(hidden, labels=labels)


# ---------------------------------------------------------------------------------------
# Applying TP to a dense model
# ---------------------------------------------------------------------------------------


def check_tp_divisibility(model_cfg, tp: int) -> None:
    """Raise ValueError naming the first size that `tp` does not divide."""
    llm = model_cfg.llm
    sizes = {
        "llm.num_heads": llm.num_heads,
        "llm.num_kv_heads": llm.num_kv_heads,
        "llm.intermediate_size": llm.intermediate_size,
        "llm.vocab_size": llm.vocab_size,
    }
    if hasattr(model_cfg, "vq"):  # Janus-Pro's code head is vocab-parallel too
        sizes["vq.codebook_size"] = model_cfg.vq.codebook_size
    for name, value in sizes.items():
        if value % tp:
            raise ValueError(f"parallel.tp={tp} does not divide {name}={value}")
    if llm.tie_word_embeddings:
        raise ValueError("parallel.tp>1 with llm.tie_word_embeddings=True is not supported (Janus-Pro unties them)")


def _megatron_config(dtype: torch.dtype, tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU allocation then a copy of the dense slice: no CUDA RNG tracker needed, the same code
    # on CPU and GPU, and TP=N starts from exactly the TP=1 weights.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _copy_shard(dst: nn.Module, src: nn.Module, dim: int, rank: int, tp: int) -> nn.Module:
    """Fill dst's weight (and bias) with this rank's slice of src's along `dim`.

    Column-parallel and vocab-parallel layers split dim 0 (their bias too); row-parallel
    layers split dim 1 and have no bias here. requires_grad follows the dense parameter, so
    freezing applied before TP survives it.
    """
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    with torch.no_grad():
        for name in ("weight", "bias"):
            d, s = getattr(dst, name, None), getattr(src, name, None)
            if d is None:
                continue
            if s.is_meta:
                d.data = torch.empty(d.shape, dtype=s.dtype, device="meta")
            else:
                d.data = s.detach().chunk(tp, dim=dim)[rank].clone()
            d.requires_grad_(s.requires_grad)
            # megatron sets these only when it initialises weights itself (we copy instead);
            # DeepSpeed's grad-norm and our full_state_dict read them. (Biases already have them.)
            if not hasattr(d, _TP_ATTR):
                set_tensor_model_parallel_attributes(d, is_parallel=True, dim=dim, stride=1)
    return dst


def apply_tensor_parallel(model: JanusModel, mpu: ParallelMPU) -> JanusModel:
    """Split `model`'s LLM and heads over mpu's TP group, in place; returns the model.

    Call it on a dense model holding real weights (or on the meta device, then load weights
    with `load_full_state_dict`). With tp=1 the model is returned unchanged.
    """
    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    if tp == 1:
        return model
    cfg = model.config
    check_tp_divisibility(cfg, tp)
    L = _layers()
    dtype = model.llm.embed_tokens.weight.dtype
    mcfg = _megatron_config(dtype, tp)
    h = cfg.llm.hidden_size

    def column(lin: nn.Linear) -> nn.Module:
        new = L.ColumnParallel(lin.in_features, lin.out_features, config=mcfg, init_method=_no_init,
                               bias=lin.bias is not None, gather_output=False)
        return _copy_shard(new, lin, 0, rank, tp)

    def row(lin: nn.Linear) -> nn.Module:
        if lin.bias is not None:
            raise ValueError("row-parallel layers here are bias-free (LLaMA-style LLM)")
        new = L.RowParallel(lin.in_features, lin.out_features, config=mcfg, init_method=_no_init,
                            bias=False, input_is_parallel=True, skip_bias_add=False)
        return _copy_shard(new, lin, 1, rank, tp)

    def vocab_head(lin: nn.Linear) -> nn.Module:
        new = L.VocabParallelHead(lin.in_features, lin.out_features, config=mcfg, init_method=_no_init,
                                  bias=lin.bias is not None, gather_output=False)
        return _copy_shard(new, lin, 0, rank, tp)

    for layer in model.llm.layers:
        attn, mlp = layer.attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = column(attn.q_proj), column(attn.k_proj), column(attn.v_proj)
        attn.o_proj = row(attn.o_proj)
        mlp.gate_proj, mlp.up_proj = column(mlp.gate_proj), column(mlp.up_proj)
        mlp.down_proj = row(mlp.down_proj)

    emb = model.llm.embed_tokens
    new_emb = L.VocabParallelEmbedding(emb.num_embeddings, h, init_method=_no_init, config=mcfg)
    model.llm.embed_tokens = _copy_shard(new_emb, emb, 0, rank, tp)
    model.lm_head = vocab_head(model.lm_head)
    if hasattr(model, "gen_head"):  # Janus-Pro's code head; JanusFlow decodes latents instead
        model.gen_head = TPGenHead(model.gen_head.fc1, vocab_head(model.gen_head.fc2))
    _check_against_plan(model)
    return model


def _check_against_plan(model: nn.Module) -> None:
    """The layers built must split exactly what TP_PLAN says (checkpoints rely on the table)."""
    for name, p in model.named_parameters():
        built = p.partition_dim if is_tp_split(p) else None
        if built != tp_split_dim(name):
            raise RuntimeError(f"tensor parallel: {name} is split along {built}, TP_PLAN says {tp_split_dim(name)}")


def _no_init(weight: torch.Tensor) -> None:
    # Weights are copied from the dense model right after construction.
    return None


# ---------------------------------------------------------------------------------------
# Whole tensors <-> this rank's shards (checkpoint/consolidate.py walks a model with these)
# ---------------------------------------------------------------------------------------


def is_tp_split(t: torch.Tensor) -> bool:
    """Whether `t` is a TP shard (megatron's layers mark their split parameters)."""
    return bool(getattr(t, _TP_ATTR, False))


def gather_tp_param(name: str, shard: torch.Tensor) -> torch.Tensor:
    """This rank's shard of parameter `name` -> the whole tensor (replicated ones pass through).

    Collective over the TP group for split parameters: every TP rank calls it with the same
    names in the same order (the engine's consolidated_state_dict walks named_parameters).
    """
    dim = tp_split_dim(name)
    if dim is None:
        return shard
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def slice_tp_param(name: str, full: torch.Tensor) -> torch.Tensor:
    """The whole tensor of parameter `name` -> this rank's shard (replicated ones pass through)."""
    dim = tp_split_dim(name)
    if dim is None:
        return full
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of shape {tuple(full.shape)} does not split {tp} ways")
    return full.chunk(tp, dim=dim)[rank]
