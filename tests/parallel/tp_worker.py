"""Worker for the multi-process TP tests; run under torchrun (gloo on CPU).

    torchrun --nproc_per_node 2 tests/parallel/tp_worker.py parity OUT.json
    torchrun --nproc_per_node 4 tests/parallel/tp_worker.py zero OUT.json

Every rank also builds the dense (TP=1) model from the same seed and runs the reference
computation itself, so one launch yields both sides of each comparison. Global rank 0 writes
a JSON report that the test asserts on.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from janus_train.contracts.synthetic import mixed_batch  # noqa: E402
from janus_train.models.janus.config import JanusConfig  # noqa: E402
from janus_train.models.janus.model import JanusModel  # noqa: E402
from janus_train.checkpoint.consolidate import full_state_dict, set_master_weights  # noqa: E402
from janus_train.parallel.chunked_loss import apply_chunked_head_loss  # noqa: E402
from janus_train.parallel.tensor_parallel import (  # noqa: E402
    apply_tensor_parallel,
    destroy_tensor_parallel,
    gather_tp_param,
    init_tensor_parallel,
    slice_tp_param,
)

SEQ, DOCS, LR, STEPS = 128, 10, 1e-3, 3


def dense_model(seed: int = 0) -> JanusModel:
    torch.manual_seed(seed)
    model = JanusModel(JanusConfig.from_preset("tiny"))
    model.init_weights(std=0.05, seed=seed)
    return model.train()


def batch_for(step: int, dp_rank: int = 0):
    return mixed_batch(JanusConfig.from_preset("tiny"), SEQ, DOCS, seed=1000 * step + dp_rank)[0]


def mean_loss(model, batch) -> torch.Tensor:
    out = model(batch)
    return out.total_sum() / sum(out.num_tokens.values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a relative error that does not blow up at entries near zero."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients gathered to full shape, keyed like the parameters (via full_state_dict)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    grads = full_state_dict(model, dst=None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return grads


def parity(out_path: str) -> None:
    mpu = init_tensor_parallel(2)
    dense = dense_model()
    tp_model = apply_tensor_parallel(copy.deepcopy(dense), mpu)
    report: dict = {"tp": mpu.get_model_parallel_world_size(), "dp": mpu.get_data_parallel_world_size()}

    # 1. Forward: hidden states, full text / gen logits and the loss.
    batch = batch_for(0)
    with torch.no_grad():
        h_d, h_t = dense.hidden_states(batch), tp_model.hidden_states(batch)
        report["hidden_rel"] = rel(h_t, h_d)
        report["text_logits_rel"] = rel(tp_model.text_logits(h_t), dense.text_logits(h_d))
        report["gen_logits_rel"] = rel(tp_model.gen_logits(h_t), dense.gen_logits(h_d))
        ld, lt = dense(batch), tp_model(batch)
        report["task_loss_rel"] = {k: rel(lt.loss_sum[k], ld.loss_sum[k]) for k in ld.loss_sum}
        report["num_tokens_equal"] = all(int(lt.num_tokens[k]) == int(ld.num_tokens[k]) for k in ld.num_tokens)
        report["tasks_present"] = {k: int(v) for k, v in ld.num_tokens.items()}

    # 2. Whole state dicts: gathering the shards gives the dense weights back bit for bit.
    full = full_state_dict(tp_model, dst=None)
    ref = dense.state_dict()
    report["full_keys_equal"] = sorted(full) == sorted(ref)
    report["full_exact"] = all(torch.equal(full[k], ref[k]) for k in ref)
    # The by-name helpers the engine's checkpoint code uses agree with both.
    report["gather_by_name_exact"] = all(torch.equal(gather_tp_param(n, p.detach()), ref[n]) for n, p in tp_model.named_parameters())
    report["slice_by_name_exact"] = all(torch.equal(slice_tp_param(n, ref[n]), p.detach()) for n, p in tp_model.named_parameters())
    report["split_params"] = sorted(n for n, p in tp_model.named_parameters() if getattr(p, "tensor_model_parallel", False))

    # 3. Gradients of one backward: TP shards gathered == dense gradients. Parameters whose
    # gradient is float noise (a softmax is shift invariant: the vision k_proj bias) are left
    # out, since a relative comparison of noise means nothing.
    b = batch_for(1)
    mean_loss(dense, b).backward()
    mean_loss(tp_model, b).backward()
    grads_t = _full_grads(tp_model)
    report["grad_rel"] = {
        n: rel(grads_t[n], p.grad) for n, p in dense.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6
    }
    dense.zero_grad(set_to_none=True)
    tp_model.zero_grad(set_to_none=True)

    # 4. Three AdamW steps on each side give the same losses.
    opt_d = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=0.1)
    opt_t = torch.optim.AdamW(tp_model.parameters(), lr=LR, weight_decay=0.1)
    losses_d, losses_t = [], []
    for step in range(STEPS):
        b = batch_for(step + 1)
        for model, opt, losses in ((dense, opt_d, losses_d), (tp_model, opt_t, losses_t)):
            opt.zero_grad(set_to_none=True)
            loss = mean_loss(model, b)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    report["losses_dense"], report["losses_tp"] = losses_d, losses_t

    # 5. A TP=1 checkpoint resumed at TP=2: whole weights loaded, then split (as the trainer does).
    fresh = dense_model(seed=7)
    fresh.load_state_dict(dense.state_dict())
    fresh = apply_tensor_parallel(fresh, mpu)
    with torch.no_grad():
        b = batch_for(9)
        report["reload_loss_rel"] = rel(mean_loss(fresh, b), mean_loss(dense, b))

    # 6. Chunked, recomputed head CE on top of the vocab-parallel heads: same loss and grads.
    def grad_rel_vs_dense(model, b) -> float:
        """Largest relative difference of the model's (gathered) gradients from dense's."""
        dense.zero_grad(set_to_none=True)
        mean_loss(model, b).backward()
        mean_loss(dense, b).backward()
        g = _full_grads(model)
        return max(rel(g[n], p.grad) for n, p in dense.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6)

    chunked = apply_chunked_head_loss(apply_tensor_parallel(copy.deepcopy(dense), mpu), chunk_tokens=50)
    b = batch_for(10)
    report["chunked_grad_rel"] = grad_rel_vs_dense(chunked, b)

    # 7. Activation checkpointing on the TP model: the recompute replays the collectives.
    ckpt = apply_tensor_parallel(copy.deepcopy(dense), mpu)
    ckpt.apply_recompute("full")
    report["checkpointed_grad_rel"] = grad_rel_vs_dense(ckpt, b)

    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))


def zero(out_path: str) -> None:
    """TP=2 x DP=2 under DeepSpeed ZeRO-1 and ZeRO-2, against a dense reference that averages
    the two data-parallel batches' losses (what DP gradient averaging computes)."""
    import deepspeed

    mpu = init_tensor_parallel(2)
    dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    report: dict = {"tp": mpu.get_model_parallel_world_size(), "dp": dp}
    for stage in (1, 2, 3):
        dense = dense_model()
        start_sd = {k: v.clone() for k, v in dense.state_dict().items()}
        ref_opt = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=0.0)
        model = apply_tensor_parallel(copy.deepcopy(dense), mpu)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        }
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=mpu)
        losses, ref_losses = [], []
        for step in range(STEPS):
            loss = mean_loss(engine, batch_for(step, dp_rank))
            engine.backward(loss)
            engine.step()
            # Mean over DP ranks, as the averaged gradient sees it.
            mean = loss.detach().clone()
            dist.all_reduce(mean, group=mpu.get_data_parallel_group())
            losses.append(float(mean) / dp)
            ref_opt.zero_grad(set_to_none=True)
            ref = sum(mean_loss(dense, batch_for(step, r)) for r in range(dp)) / dp
            ref.backward()
            torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
            ref_opt.step()
            ref_losses.append(float(ref))
        # The engine's checkpoint path: DeepSpeed's fp32 masters gathered over DP, then TP
        # (whole weights on rank 0). ZeRO-3 partitions the module's own copies, so only
        # ZeRO-1/2 can also be read through full_state_dict.
        cons = full_state_dict(engine.module, stage)
        after = full_state_dict(engine.module, 0, dst=None) if stage < 3 else cons
        cons_equal = None if cons is None else all(torch.equal(cons[k], after[k]) for k in after)
        # And back: exact whole weights into the shards' masters (a stage hand-over).
        set_master_weights(engine.module, start_sd)
        back = full_state_dict(engine.module, stage)
        back_equal = None if back is None else all(torch.equal(back[k], start_sd[k]) for k in start_sd)
        ref_sd = dense.state_dict()
        report[f"zero{stage}"] = {
            "consolidated_equals_full": cons_equal,
            "set_master_roundtrip": back_equal,
            "losses": losses,
            "ref_losses": ref_losses,
            # Adam turns float-noise gradients into +-lr steps, so compare weights absolutely.
            "weights_after_max_abs": None if after is None else max(
                float((after[k] - v).abs().max()) for k, v in ref_sd.items() if v.is_floating_point()
            ),
            "dp_group_size": dist.get_world_size(engine.optimizer.dp_process_group) if hasattr(engine.optimizer, "dp_process_group") else None,
        }
        engine.destroy()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))


def main() -> None:
    mode, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        {"parity": parity, "zero": zero}[mode](out_path)
    finally:
        destroy_tensor_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
