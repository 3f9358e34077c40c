"""What to evaluate on: held-out sets per task (`EvalData`) and how (`EvalSettings`).

An eval data file (YAML; relative paths are relative to it):

    und:  [{path: shards/und_heldout}]     # und shards: val loss, and QA accuracy on their answers
    text: [{path: shards/text_heldout}]    # text shards: val loss
    gen:  [{path: shards/gen_heldout}]     # pre-tokenised gen shards (VQ codes; JanusFlow: VAE latents):
                                           #   val loss; their captions are drawn
    seq_len: 1024                          # row length of the loss batches
    mmbench: /data/MMBench_DEV_EN.tsv      # optional: VLMEvalKit's MMBench TSV, scored by likelihood
    geneval: /data/evaluation_metadata.jsonl   # optional: GenEval prompts, written in GenEval's layout

The same keys form the `eval.data` section of a training config. A training data config
(with `ratio`, `global_batch`, ...) is accepted too: keys that only mean something to
training are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from janus_train.contracts.batch import TASKS
from janus_train.contracts.errors import ConfigError, from_validation_error
from janus_train.data.config import Source

Int = Annotated[int, Strict()]
EVAL_TASKS = ("loss", "und", "gen")
# Keys of a training data config that evaluation ignores.
_TRAINING_ONLY = ("ratio", "global_batch", "micro_batch_rows", "dp_size", "dp_rank", "cfg_dropout", "num_workers", "granularity",
                  "sharding", "lookahead", "max_wait_steps", "chunk_size", "prefetch", "jpeg_draft", "worker_start_method", "root",
                  "truncation", "seed")


class EvalData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    und: list[Source] = []
    text: list[Source] = []
    gen: list[Source] = []
    seq_len: Int = Field(1024, ge=8)
    tokenizer: str | None = None  # default: the checkpoint's
    # The und system prompt, which must be the one the model was trained with: "default" =
    # DeepSeek's, null = none. Unset, it follows the training run's data.und_system_prompt where
    # that is known (`following`), else "default".
    und_system_prompt: str | None = "default"
    mmbench: str | None = None
    geneval: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "eval.data") -> "EvalData":
        d = {k: v for k, v in dict(d or {}).items() if k not in _TRAINING_ONLY}
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise from_validation_error(e, where, where="docs/evaluation.md") from None

    def following(self, training_prompt: str | None) -> "EvalData":
        """This data with the training run's system prompt, unless the eval data sets its own."""
        if "und_system_prompt" in self.model_fields_set:
            return self
        return self.model_copy(update={"und_system_prompt": training_prompt})  # now set: a second call keeps it

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalData":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError("--data", f"eval data file {str(path)!r} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
        if isinstance(d, dict) and set(d) == {"data"}:
            d = d["data"]
        if not isinstance(d, dict):
            raise ConfigError("--data", f"{path}: an eval data file must be a mapping, got {type(d).__name__}")
        base = path.parent
        for task in TASKS:  # relative paths are relative to the file
            d[task] = [_rebase(s, base) for s in d.get(task) or []]
        for key in ("mmbench", "geneval", "tokenizer"):
            if isinstance(d.get(key), str) and not Path(d[key]).is_absolute():
                d[key] = str(base / d[key])
        return cls.from_dict(d, where="data")

    def check_exists(self, tasks: tuple[str, ...], key: str = "data") -> None:
        """ConfigError naming the first set the tasks need that is missing on disk."""
        need = []
        if "loss" in tasks:
            need += [(f"{key}.{t}[{i}].path", s.path, True) for t in TASKS for i, s in enumerate(getattr(self, t))]
        if "und" in tasks:
            need += [(f"{key}.und[{i}].path", s.path, True) for i, s in enumerate(self.und)]
            if self.mmbench:
                need.append((f"{key}.mmbench", self.mmbench, False))
        if "gen" in tasks:
            need += [(f"{key}.gen[{i}].path", s.path, True) for i, s in enumerate(self.gen)]
            if self.geneval:
                need.append((f"{key}.geneval", self.geneval, False))
        for k, p, is_dir in need:
            if not (Path(p).is_dir() if is_dir else Path(p).is_file()):
                raise ConfigError(k, f"eval set {p!r} does not exist")
        if "und" in tasks and not (self.und or self.mmbench):
            raise ConfigError(key, "task und needs held-out und shards (und:) or an MMBench TSV (mmbench:)")
        if "gen" in tasks and not (self.gen or self.geneval):
            raise ConfigError(key, "task gen needs held-out gen shards (gen:) or GenEval prompts (geneval:)")
        if "loss" in tasks and not (self.und or self.text or self.gen):
            raise ConfigError(key, "task loss needs held-out shards (und:, text: or gen:)")


def _rebase(source: Any, base: Path) -> Any:
    if isinstance(source, str) and not Path(source).is_absolute():
        return str(base / source)
    if isinstance(source, dict) and "path" in source and not Path(str(source["path"])).is_absolute():
        return dict(source, path=str(base / source["path"]))
    return source


class EvalSettings(BaseModel):
    """How to evaluate (the `eval:` section of a training config minus its schedule and data,
    and the CLI's options)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[Literal[EVAL_TASKS]] = list(EVAL_TASKS)  # type: ignore[valid-type]
    num: Int = Field(64, ge=1)  # items per task: documents per loss set, questions, prompts
    cfg: float = Field(5.0, ge=0.0)  # guidance weight of the gen samples
    temperature: float = Field(1.0, gt=0.0)  # of the gen samples (Janus-Pro: JanusFlow's ODE draws no tokens)
    flow_steps: Int = Field(30, ge=1)  # JanusFlow: Euler steps of each gen sample's ODE
    max_new_tokens: Int = Field(48, ge=1)  # answer length limit
    scorer: str | None = None  # gen scorer (eval/scorers.py), e.g. shapes; None: samples only
    geneval_samples: Int = Field(4, ge=1)  # images per GenEval prompt
    seed: Int = 0  # sampling seed (prompt i uses seed + i)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise ConfigError("--tasks", f"unknown task(s) {bad or [text]}; tasks are {list(EVAL_TASKS)}")
    return tasks
