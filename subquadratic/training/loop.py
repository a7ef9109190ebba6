"""The training loop: one function, `train(config)`, that runs unchanged as plain `python` on one device and
under `accelerate launch` on any number of processes and machines (DDP, or FSDP with `fsdp: true`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, get_scheduler

from ..modeling.auto import known_model_types
from .checkpoints import checkpoint_dir, latest_checkpoint, prune, publish, temporary_path
from .config import TrainConfig
from .cuda_graph import CapturedTrainingStep
from .data import Corpus, PackedBlocks, ResumableSampler, load_corpus, mlm_collator
from .evaluation import bits_per_character, causal_lm_nll, masked_lm_metrics, perplexity_per_word
from .hub import check_push_ready, push_folder
from .model_card import build_model_card, write_model_card
from .tokenizer import byte_tokenizer

CARD_SETTINGS = ("dataset", "task", "seq_len", "batch_size", "gradient_accumulation_steps", "learning_rate",
                 "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "mixed_precision", "max_steps", "seed")
SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


class TrainState:
    """What a resumed run needs beyond model, optimizer, scheduler and RNG: the step and the data position."""

    def __init__(self):
        self.step, self.epoch, self.batches_in_epoch, self.tokens = 0, 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)



def masking_ids(corpus: Corpus) -> tuple[int, int, list[int]]:
    """(vocab_size, mask id, special ids) for masked-LM training. Byte corpora get two extra ids after the 256
    bytes: `<mask>` = 256 and `<pad>` = 257."""
    if corpus.unit == "byte":
        return 258, 256, [256, 257]
    tok = corpus.tokenizer
    return len(tok), tok.mask_token_id, list(tok.all_special_ids)


def build_model(cfg: TrainConfig, corpus: Corpus):
    """The model for the task, from `init_from` or from `model_type` + `model`; every mismatch is an error here,
    before any training starts."""
    causal = cfg.task == "causal_lm"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    vocab = corpus.vocab_size if causal else masking_ids(corpus)[0]
    if cfg.init_from:
        model = auto.from_pretrained(cfg.init_from)
    else:
        try:
            AutoConfig.for_model(cfg.model_type)
        except ValueError:
            raise ValueError(f"unknown model_type {cfg.model_type!r}; this package has {known_model_types()} "
                             "(model types of transformers work too)") from None
        fields = dict(cfg.model)
        if fields.get("is_decoder", causal) != causal:
            raise ValueError(f"model.is_decoder={fields['is_decoder']} contradicts task={cfg.task!r} "
                             f"(causal_lm needs is_decoder=True, masked_lm needs False)")
        fields.update(vocab_size=vocab, is_decoder=causal)
        config = AutoConfig.for_model(cfg.model_type, **fields)
        try:
            model = auto.from_config(config)
        except ValueError as e:
            raise ValueError(f"model_type {cfg.model_type!r} has no {'causal' if causal else 'masked'}-LM head: "
                             f"choose the other task") from e
    if model.config.vocab_size < vocab:
        raise ValueError(f"the model's vocab_size={model.config.vocab_size} is smaller than the data's {vocab}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise ValueError(f"seq_len={cfg.seq_len} is longer than the model takes (max_position_embeddings={limit}); "
                         f"use seq_len <= {limit} or raise model.max_position_embeddings")
    return model


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def evaluate(model, corpus: Corpus, cfg: TrainConfig, split: str, max_tokens: int, device) -> dict:
    """Metrics of one split: bits per character for byte corpora, perplexity per word of the original text for
    token corpora (per token when only part of the split is read), masked-LM loss and accuracy."""
    ids = getattr(corpus, split)
    whole = max_tokens == 0 or max_tokens >= len(ids)
    ids = ids if whole else ids[:max_tokens]
    if cfg.task == "masked_lm":
        vocab, mask_id, specials = masking_ids(corpus)
        collate = mlm_collator(corpus.tokenizer, vocab_size=vocab, mask_token_id=mask_id,
                               special_token_ids=specials, seed=cfg.seed)
        loader = DataLoader(PackedBlocks(ids, cfg.seq_len), batch_size=cfg.batch_size, collate_fn=collate)
        return {f"{split}/{k}": v for k, v in masked_lm_metrics(model, loader, device=device).items()}
    nll, count = causal_lm_nll(model, ids, seq_len=cfg.seq_len, stride=cfg.eval_stride, batch_size=cfg.batch_size,
                               device=device)
    metrics = {f"{split}/loss": nll / count}
    if corpus.unit == "byte":
        metrics[f"{split}/bpc"] = bits_per_character(nll, count)
    elif whole:
        metrics[f"{split}/ppl_per_word"] = perplexity_per_word(nll, corpus.words[split])
    else:
        metrics[f"{split}/ppl_per_token"] = math.exp(nll / count)
    return metrics


class Run:
    """One training run: set up from a `TrainConfig`, then `run()`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.push_to_hub:
            check_push_ready(cfg.push_to_hub)  # no token or offline: an error now, not after training
        # FSDP2 (`fully_shard`): parameters stay registered on their modules with their shapes, which the reversible
        # layers need, and accelerate moves the optimizer onto the sharded parameters in `prepare`. (FSDP1 without
        # use_orig_params flattens them away; an optimizer built before `prepare` then trains nothing.)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if cfg.fsdp else None
        # find_unused_parameters is settled once the model is built (see `build_model` below)
        self.ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=False)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without a GPU, several processes train together on the CPU (gloo)
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=cfg.trackers or None, project_dir=cfg.output_dir, fsdp_plugin=plugin,
            step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the process count
            kwargs_handlers=[self.ddp_kwargs])
        if cfg.cuda_graph and (not torch.cuda.is_available() or self.accelerator.num_processes > 1):
            raise ValueError(f"training config `cuda_graph`=True records the step on one GPU in one process; this "
                             f"run has {torch.cuda.device_count()} GPU(s) and {self.accelerator.num_processes} "
                             f"process(es). Set `cuda_graph` false.")
        self.graph: CapturedTrainingStep | None = None  # recorded at the first step (cfg.cuda_graph)
        set_seed(cfg.seed)
        with self.accelerator.main_process_first():
            saved_tokenizer = os.path.isdir(cfg.tokenizer)
            token_level = cfg.dataset.startswith("wikitext")
            bpe = token_level and cfg.tokenizer == "bpe"  # a word-level vocabulary keeps every training word
            self.corpus = load_corpus(cfg.dataset, cfg.data_path,
                                      vocab_size=cfg.tokenizer_vocab_size if bpe else None,
                                      tokenizer_path=cfg.tokenizer if saved_tokenizer else None,
                                      tokenizer_kind="word" if saved_tokenizer else cfg.tokenizer,
                                      cache_dir=os.path.join(cfg.output_dir, "data_cache"))
        self.model = build_model(cfg, self.corpus)
        # DDP checks for unused parameters only where some batch can leave one without a gradient (a model of
        # this package says so; models of transformers are not known, so they are checked), as Trainer does.
        self.ddp_kwargs.find_unused_parameters = not getattr(self.model, "every_parameter_used_by_every_batch", False)
        dataset = PackedBlocks(self.corpus.train, cfg.seq_len)
        if len(dataset) < cfg.batch_size * self.accelerator.num_processes:
            raise ValueError(f"the training split has {len(dataset)} blocks of seq_len={cfg.seq_len}, fewer than one "
                             f"global batch ({cfg.batch_size} x {self.accelerator.num_processes} processes)")
        self.sampler = ResumableSampler(len(dataset), cfg.seed)
        collate = None
        if cfg.task == "masked_lm":
            vocab, mask_id, specials = masking_ids(self.corpus)
            # masks depend on (seed, the batch's ids): different per batch and process, the same after a resume
            collate = mlm_collator(self.corpus.tokenizer, vocab_size=vocab, mask_token_id=mask_id,
                                   special_token_ids=specials, seed=cfg.seed)
        # A generator of its own: starting an epoch's iterator must not draw from the global RNG, or a resumed run
        # (which starts one mid-epoch) would see different dropout and LSH rotations from an uninterrupted one.
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate,
                            drop_last=True, num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        optimizer = _optimizer(self.model, cfg)
        scheduler = get_scheduler(SCHEDULE_NAMES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.max_steps)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            self.model, optimizer, loader, scheduler)
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.tokens_per_step = (cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps
                                * self.accelerator.num_processes)

    # --- data ------------------------------------------------------------------------------------------------
    def batches(self):
        """Micro-batches forever, epoch after epoch, starting from the saved data position."""
        per_batch = self.cfg.batch_size * self.accelerator.num_processes
        while True:
            self.sampler.load_state_dict({"epoch": self.state.epoch,
                                          "position": self.state.batches_in_epoch * per_batch})
            for batch in self.loader:
                self.state.batches_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    # --- output ----------------------------------------------------------------------------------------------
    def log(self, metrics: dict) -> None:
        self.accelerator.log(metrics, step=self.state.step)
        if self.accelerator.is_main_process:
            with open(os.path.join(self.cfg.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.step, **metrics}) + "\n")

    def save_checkpoint(self) -> None:
        final = os.path.join(checkpoint_dir(self.cfg.output_dir), f"step-{self.state.step:08d}")
        tmp = temporary_path(final)
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(tmp)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            publish(tmp, final)
            prune(self.cfg.output_dir, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def save_pretrained(self, metrics: dict) -> str:
        """The `from_pretrained` folder (`output_dir/model`): weights, config, code, tokenizer, metrics."""
        final = os.path.join(self.cfg.output_dir, "model")
        tmp = temporary_path(final)
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer = self.corpus.tokenizer or byte_tokenizer()
            tokenizer.save_pretrained(tmp)
            settings = {k: getattr(self.cfg, k) for k in CARD_SETTINGS}
            description = (f"Trained with `subquadratic-train` for {self.state.step} optimizer steps "
                           f"({self.state.tokens:,} tokens) on {self.accelerator.num_processes} process(es), "
                           f"{self.accelerator.mixed_precision} mixed precision.")
            card = build_model_card(model.config, task=self.cfg.task, dataset=self.cfg.dataset, metrics=metrics,
                                    training_description=description, training_settings=settings,
                                    repo_id=self.cfg.push_to_hub)
            write_model_card(tmp, card)
            with open(os.path.join(tmp, "train_results.json"), "w", encoding="utf-8") as f:
                json.dump({"step": self.state.step, "tokens": self.state.tokens, **metrics,
                           "config": vars(self.cfg)}, f, indent=1, default=str)
            publish(tmp, final)
        self.accelerator.wait_for_everyone()
        return final

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        os.makedirs(cfg.output_dir, exist_ok=True)
        # trackers take scalars and strings only (TensorBoard's hparams refuse None and lists)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in vars(cfg).items()}
        acc.init_trackers("subquadratic", config=hparams)
        resume_from = latest_checkpoint(cfg.output_dir) if cfg.resume else None
        if resume_from:
            acc.load_state(resume_from)
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
        unwrapped = acc.unwrap_model(self.model)
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not acc.is_main_process,
                   dynamic_ncols=True, desc="train")
        batches = self.batches()
        self.model.train()
        window_loss, window_steps, window_start = 0.0, 0, time.time()
        metrics: dict = {}
        deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
        while self.state.step < cfg.max_steps and not self.out_of_time(deadline):
            if cfg.cuda_graph:
                window_loss += self.recorded_step(batches)
            else:
                for _ in range(cfg.gradient_accumulation_steps):
                    batch = next(batches)
                    with acc.accumulate(self.model):
                        loss = self.model(**batch).loss
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()  # a no-op until the last micro-batch of the step
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    window_loss += acc.reduce(loss.detach(), "mean").item() / cfg.gradient_accumulation_steps
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            window_steps += 1
            bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                elapsed = time.time() - window_start
                metrics = {"train/loss": window_loss / window_steps, "lr": self.scheduler.get_last_lr()[0],
                           "tokens_per_s": window_steps * self.tokens_per_step / max(elapsed, 1e-9)}
                if torch.cuda.is_available():
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                self.log(metrics)
                window_loss, window_steps, window_start = 0.0, 0, time.time()
            if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < cfg.max_steps:
                self.log(self.evaluate_on_main(unwrapped, "valid", cfg.eval_tokens))
                self.model.train()
            if cfg.save_every and self.state.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        final = {}
        if cfg.final_eval:
            for split in ("valid", "test"):
                final.update(self.evaluate_on_main(unwrapped, split, 0))
            self.log(final)
        self.save_checkpoint()
        folder = self.save_pretrained(final)
        if cfg.push_to_hub and acc.is_main_process:
            acc.print(f"pushed to {push_folder(folder, cfg.push_to_hub)}")
        acc.end_training()
        acc.print(f"saved {folder}; final metrics {json.dumps(final)}")
        return {**metrics, **final}

    def recorded_step(self, batches) -> float:
        """One optimizer step whose micro-batches replay the recorded graph (`cuda_graph`); returns their mean
        loss. The graph adds each micro-batch's gradients (of its loss / gradient_accumulation_steps) into the
        parameters' .grad, which are zeroed in place after the update. Always gradient_accumulation_steps
        micro-batches per step, across epoch boundaries too (the eager branch lets accelerate also step at an
        epoch's last micro-batch)."""
        cfg, steps = self.cfg, self.cfg.gradient_accumulation_steps
        total = None
        for _ in range(steps):
            batch = next(batches)
            if self.graph is None:
                # The model without accelerate's autocast wrapper, whose cast cache must be off while recording:
                # this takes the wrapper off the model for the rest of the run (evaluation runs under
                # `accelerator.autocast()` itself, and the recording under its own autocast).
                self.graph = CapturedTrainingStep(
                    self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False), batch,
                    compute_loss=lambda model, b: model(**b).loss / steps,
                    autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None)
            loss = self.graph(batch)
            total = loss.clone() if total is None else total + loss  # before the next replay overwrites it
        if cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        return total.item()

    def out_of_time(self, deadline: float | None) -> bool:
        """Whether the wall-clock budget is spent, decided by the main process so that all stop together."""
        if deadline is None:
            return False
        flag = torch.tensor(float(time.time() > deadline), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())

    def evaluate_on_main(self, unwrapped, split: str, max_tokens: int) -> dict:
        """Evaluation on the main process (with FSDP every process runs it, since each forward pass gathers the
        sharded parameters from all of them); the others wait."""
        metrics = {}
        if self.accelerator.is_main_process or self.cfg.fsdp:
            model = self.model if self.cfg.fsdp else unwrapped
            with self.accelerator.autocast():
                metrics = evaluate(model, self.corpus, self.cfg, split, max_tokens, self.accelerator.device)
        self.accelerator.wait_for_everyone()
        return metrics if self.accelerator.is_main_process else {}


def train(cfg: TrainConfig) -> dict:
    return Run(cfg).run()
