"""A tqdm bar on rank 0: step, loss, tokens/s, ETA for the current stage."""

from __future__ import annotations


from janus_train.logging.callback import Callback


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar = None
        self.last_eval: dict[str, str] = {}  # the latest evaluation, shown until the next one

    def on_stage_start(self, trainer, stage) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=stage.steps, initial=trainer.stage_step, desc=f"stage {stage.index}", unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer, stage, record) -> None:
        if self.bar is None:
            return
        self.bar.n = record.stage_step
        loss = record.loss
        shown = {"loss": f"{loss:.4f}" if isinstance(loss, float) else loss, "tok_s": f"{record.tokens_per_s:.0f}"}
        if record.eval:
            self.last_eval = {k: f"{v:.3f}" for k, v in record.eval.items() if k in ("und_acc", "gen_acc", "loss_und", "loss_gen")}
        self.bar.set_postfix({**shown, **self.last_eval}, refresh=False)
        self.bar.refresh()

    def on_stage_end(self, trainer, stage) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_run_end(self, trainer, state: str) -> None:
        self.on_stage_end(trainer, None)
