"""Training configuration: one dataclass, loaded from a YAML/JSON file or a named preset, with command-line
overrides.

    subquadratic-train reformer-enwik8-tiny --max_steps 200 --model.hidden_size 128 --output_dir runs/x
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

TASKS = ("causal_lm", "masked_lm")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run reads.

    Attributes:
        model_type: a `model_type` of the package (`reformer_lm`, `longformer_style`, `linformer_encoder`), or
            of `transformers` (e.g. `gpt2`, as a full-attention baseline).
        model: fields of that model's config (see its class, e.g. `help(subquadratic.ReformerLMConfig)`);
            `vocab_size` and `is_decoder` are set from the data and the task.
        init_from: a `save_pretrained` folder (or hub name) to start from instead of fresh weights.
        dataset: `enwik8`, `wikitext-103`, `wikitext-2`, `text` (any local UTF-8 file, byte-level) or
            `tiny_shakespeare` (bundled, the built-in default).
        data_path: local file or folder of the data set (None: the hub name through `datasets`).
        tokenizer: for token corpora, `word` or `bpe` (trained on the training split), or a saved tokenizer folder.
        tokenizer_vocab_size: vocabulary of a trained BPE tokenizer.
        task: `causal_lm` or `masked_lm` (15% of tokens, 80/10/10).
        seq_len: tokens per training sequence (contiguous blocks of the corpus).
        batch_size: sequences per process per micro-batch; the global batch is
            batch_size * processes * gradient_accumulation_steps.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW (no decay on biases and norms).
        schedule: `cosine`, `linear` (decay to 0 after warm-up) or `constant` (after warm-up).
        warmup_steps: linear warm-up steps.
        max_grad_norm: gradient clipping (0 disables).
        mixed_precision: `no`, `bf16` or `fp16` (autocast through accelerate).
        seed: seeds weights, data order and masking.
        max_steps: optimizer steps.
        max_minutes: also stop after this much wall-clock time from the first step (evaluations during training
            included); the schedule still spans max_steps (for comparisons at equal compute). None: no limit.
        log_every: steps between log lines (progress bar, JSON lines, trackers).
        eval_every: steps between evaluations on (the first `eval_tokens` of) the validation split (0: only at the end).
        eval_tokens: tokens of the validation split used by the evaluations during training (0: all).
        eval_stride: window stride of causal evaluation (None: non-overlapping windows of seq_len).
        final_eval: evaluate the full validation and test splits at the end.
        save_every: steps between resumable checkpoints (0: only at the end).
        keep_checkpoints: resumable checkpoints kept (older ones are deleted after a newer one is complete).
        output_dir: where checkpoints, the `save_pretrained` folder (`model/`), logs and metrics go.
        resume: continue from the newest complete checkpoint in output_dir, if there is one.
        trackers: accelerate trackers (`tensorboard`, `wandb`, ...); metrics also go to `metrics.jsonl`.
        fsdp: shard parameters with FSDP instead of DDP (multi-GPU).
        cuda_graph: record a micro-batch's forward and backward pass as one CUDA graph at the first step and replay
            it (`subquadratic.training.cuda_graph`): for sequences short enough that an eager step waits on the
            host launching kernels (16K tokens and below, BENCHMARKS.md). One GPU and one process; mixed_precision
            `no` or `bf16`; global tokens only with the model config's `max_global_tokens`; no Reformer with
            dropout.
        num_workers: DataLoader workers.
        push_to_hub: a hub repository id (`user/name`) to upload the `model/` folder to at the end (needs
            `hf auth login` or HF_TOKEN; checked before training starts).
        sample_prompt: for causal models, reload the saved folder with `AutoModelForCausalLM.from_pretrained`
            at the end and print a continuation of this prompt (None: skip).
    """

    model_type: str = "reformer_lm"
    model: dict = field(default_factory=dict)
    init_from: str | None = None
    dataset: str = "tiny_shakespeare"
    data_path: str | None = None
    tokenizer: str = "word"
    tokenizer_vocab_size: int = 32000
    task: str = "causal_lm"
    seq_len: int = 256
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    max_steps: int = 1000
    max_minutes: float | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_tokens: int = 65536
    eval_stride: int | None = None
    final_eval: bool = True
    save_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str = "outputs/run"
    resume: bool = True
    trackers: list = field(default_factory=lambda: ["tensorboard"])
    fsdp: bool = False
    cuda_graph: bool = False
    num_workers: int = 0
    push_to_hub: str | None = None
    sample_prompt: str | None = "ROMEO:\n"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # YAML reads "3e-4" as a string; numbers given as text are converted
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and isinstance(value, (str, int)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"training config `{f.name}`={value!r} is not valid: expected a number") from None

        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"

        def check(ok, name, allowed):
            if not ok:
                raise ValueError(f"training config `{name}`={getattr(self, name)!r} is not valid: {allowed}.")

        check(self.task in TASKS, "task", f"expected one of {list(TASKS)}")
        check(self.schedule in SCHEDULES, "schedule", f"expected one of {list(SCHEDULES)}")
        check(self.mixed_precision in PRECISIONS, "mixed_precision", f"expected one of {list(PRECISIONS)}")
        for name in ("seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "log_every",
                     "keep_checkpoints"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "expected an integer > 0")
        for name in ("warmup_steps", "eval_every", "save_every", "eval_tokens", "num_workers"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "expected an integer >= 0")
        check(self.eval_stride is None or 0 < self.eval_stride <= self.seq_len, "eval_stride",
              f"expected None or 1..seq_len={self.seq_len}")
        check(isinstance(self.model, dict), "model", "expected a mapping of model config fields")
        check(isinstance(self.cuda_graph, bool), "cuda_graph", "expected true or false")
        check(not (self.cuda_graph and self.mixed_precision == "fp16"), "mixed_precision",
              "cuda_graph takes `no` or `bf16` (fp16's loss scaling is not recorded)")
        check(not (self.cuda_graph and self.fsdp), "fsdp", "cuda_graph trains on one GPU, without FSDP")


def preset_names() -> list[str]:
    folder = resources.files("subquadratic.training").joinpath("configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(source: str) -> dict:
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return (json.load(f) if source.endswith(".json") else yaml.safe_load(f)) or {}
    if source in preset_names():
        text = resources.files("subquadratic.training").joinpath(f"configs/{source}.yaml").read_text()
        return yaml.safe_load(text) or {}
    raise FileNotFoundError(f"config {source!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(source: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name or a YAML/JSON file, then `--key value` / `--key=value` overrides (dotted keys reach into
    `model`; values are parsed as YAML, so `--trackers []` and `--eval_stride 128` work)."""
    raw = _read(source) if source else {}
    tokens = list(overrides or [])
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: overrides look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if not tokens:
                raise ValueError(f"override --{key} has no value")
            value = tokens.pop(0)
        _set(raw, key.replace("-", "_") if "." not in key else key, yaml.safe_load(value))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(names)}")
    return TrainConfig(**raw)
