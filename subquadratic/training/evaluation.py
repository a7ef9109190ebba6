"""Evaluation of language models on whole splits: causal-LM negative log-likelihood over sliding windows (bits per
character for bytes, per-word perplexity for WikiText) and masked-LM loss / accuracy.

    nll, n = causal_lm_nll(model, corpus.test, seq_len=1024, stride=512)
    bits_per_character(nll, n)                  # enwik8
    perplexity_per_word(nll, corpus.words["test"])  # WikiText

The model is any causal / masked LM of the package or of `transformers`: it is called as `model(input_ids=...)` and
only `.logits` is used; losses are computed here, in fp32. The model is put in eval mode and its previous mode
restored. No cross-process gathering: call these on the main process with the unwrapped model
(`accelerator.unwrap_model(model)`) and a plain DataLoader."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def eval_windows(num_ids: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows `causal_lm_nll` runs: (begin, end, score_from), meaning the model reads ids[begin:end] and
    scores the tokens at positions [score_from, end). Together they score every position in [1, num_ids) exactly
    once.

    Windows start at 0, stride, 2 * stride, ... while they fit; the first scores all its positions (from 1), each
    later one only the tokens past the previous window's end, which have at least seq_len - stride tokens of
    context. A window of seq_len ids can score at most seq_len - 1 new tokens (its first id is context only), so
    stride=seq_len (the default, "non-overlapping") advances by seq_len - 1: each window re-reads the previous
    one's last token. If the last window stops short of the end, one more is aligned to the end of the ids (so
    every window has exactly seq_len ids, as models with chunked attention need) and scores the rest. Ids shorter
    than seq_len make a single window."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens (one to read, one to score)")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride}: must be in [1, seq_len={seq_len}] (a larger stride would skip tokens)")
    stride = min(stride, seq_len - 1)
    if num_ids < 2:
        return []
    if num_ids <= seq_len:
        return [(0, num_ids, 1)]
    windows = []
    scored_to = 1  # the first position not scored yet
    begin = 0
    while begin + seq_len <= num_ids:
        end = begin + seq_len
        windows.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    if scored_to < num_ids:
        windows.append((num_ids - seq_len, num_ids, scored_to))
    return windows


@torch.no_grad()
def causal_lm_nll(model, ids: torch.Tensor, *, seq_len: int, stride: int | None = None, batch_size: int = 8,
                  device=None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihood (nats) over every token of `ids` except the first, and the number
    of scored tokens (len(ids) - 1). Windows of `seq_len` tokens advance by `stride` (default seq_len:
    non-overlapping, each window re-reading the previous one's last id); each window scores only the tokens no
    earlier window scored, so with stride < seq_len every token after the first window gets at least
    seq_len - stride tokens of context (the Hugging Face perplexity recipe; see `eval_windows`, which also aligns a
    last window to the end of `ids`). The first window scores all its positions. Models whose forward takes
    `logits_to_keep` are asked for only the logits they need."""
    if ids.dim() != 1:
        raise ValueError(f"ids: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    windows = eval_windows(len(ids), seq_len, stride)
    device = _device_of(model, device)
    keep_logits = _accepts(model, "logits_to_keep")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device=device, dtype=torch.long)  # (B, T)
            width = inputs.shape[1]
            # Position p's logits predict token p + 1: scoring [score_from, end) needs the logits at
            # [score_from - begin - 1, end - begin - 1), i.e. among the last (end - score_from + 1) positions.
            keep = min(width, max(e - s for _, e, s in batch) + 1)
            kwargs = {"logits_to_keep": keep} if keep_logits and keep < width else {}
            logits = model(input_ids=inputs, **kwargs).logits  # (B, K, V), K = keep or T
            offset = width - logits.shape[1]  # the window position of logits[:, 0]
            for row, (begin, end, score_from) in enumerate(batch):
                predicting = logits[row, score_from - begin - 1 - offset:end - begin - 1 - offset]
                targets = inputs[row, score_from - begin:end - begin]
                total += F.cross_entropy(predicting.float(), targets, reduction="sum").item()
                count += end - score_from
    finally:
        model.train(was_training)
    return total, count


def bits_per_character(nll_sum: float, num_bytes: int) -> float:
    """nll_sum / num_bytes / ln 2: bits per byte, what enwik8 results call bits per character."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes={num_bytes}: must be positive")
    return nll_sum / num_bytes / math.log(2)


def perplexity_per_word(nll_sum: float, num_words: int) -> float:
    """exp(nll_sum / num_words): with `num_words` = `Corpus.words[split]` (line ends counted as words), comparable
    across tokenizers. The split's first token is never scored, a 1-in-200,000 difference on WikiText-103."""
    if num_words <= 0:
        raise ValueError(f"num_words={num_words}: must be positive")
    return math.exp(nll_sum / num_words)


def causal_lm_metrics(model, corpus, split: str = "valid", *, seq_len: int, stride: int | None = None,
                      batch_size: int = 8, device=None) -> dict[str, float]:
    """`causal_lm_nll` on a whole `Corpus` split, with the metric of its unit: {"loss": nats per scored token,
    "tokens": count, "bpc" (byte corpora) or "ppl" (per-word perplexity, token corpora)}."""
    nll, count = causal_lm_nll(model, corpus.split(split), seq_len=seq_len, stride=stride, batch_size=batch_size,
                               device=device)
    metrics = {"loss": nll / count if count else float("nan"), "tokens": count}
    if corpus.unit == "byte":
        metrics["bpc"] = bits_per_character(nll, count) if count else float("nan")
    else:
        metrics["ppl"] = perplexity_per_word(nll, corpus.words[split])
    return metrics


@torch.no_grad()
def masked_lm_metrics(model, dataloader, device=None, *, max_batches: int | None = None) -> dict[str, float]:
    """Over the batches of `dataloader` (from `mlm_collator`: "input_ids", "labels" with -100 at unmasked
    positions, maybe "attention_mask"): {"loss": mean cross-entropy over masked positions, "accuracy": fraction of
    masked positions whose argmax is the label, "masked_tokens": their number}. NaN loss and accuracy if nothing
    was masked. Use a seeded collator and an unshuffled loader for numbers comparable between evaluations."""
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    loss_sum, correct, masked = 0.0, 0, 0
    try:
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            labels = batch["labels"].to(device)
            kwargs = {"input_ids": batch["input_ids"].to(device)}
            if batch.get("attention_mask") is not None:
                kwargs["attention_mask"] = batch["attention_mask"].to(device)
            logits = model(**kwargs).logits  # (B, T, V)
            chosen = labels != -100
            selected = logits[chosen].float()  # (n, V): only the masked positions go to fp32
            targets = labels[chosen]
            loss_sum += F.cross_entropy(selected, targets, reduction="sum").item()
            correct += int((selected.argmax(dim=-1) == targets).sum())
            masked += int(chosen.sum())
    finally:
        model.train(was_training)
    if masked == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "masked_tokens": 0}
    return {"loss": loss_sum / masked, "accuracy": correct / masked, "masked_tokens": masked}
