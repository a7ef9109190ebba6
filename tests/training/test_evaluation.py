"""Evaluation metrics on cases whose answer is known in closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from subquadratic.training.data import Corpus, PackedBlocks, mlm_collator
from subquadratic.training.evaluation import (
    bits_per_character,
    causal_lm_metrics,
    causal_lm_nll,
    eval_windows,
    masked_lm_metrics,
    perplexity_per_word,
)

WINDOW_CASES = [(2, 2, None), (10, 4, None), (10, 4, 2), (11, 4, 3), (9, 4, 1), (100, 7, 5), (100, 7, 7),
                (3, 4, None), (4, 4, None), (5, 4, None), (1000, 64, 16), (1000, 64, 63), (129, 64, 32)]


class Stub(nn.Module):
    """Records what it was called with; subclasses say what the logits are."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(()))  # a parameter, so the device can be read off the model
        self.calls = []

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None):
        self.calls.append({"shape": tuple(input_ids.shape), "training": self.training,
                           "attention_mask": attention_mask})
        return SimpleNamespace(logits=self.logits(input_ids))


class Uniform(Stub):
    def logits(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab_size, dtype=torch.bfloat16)  # fp32 is the evaluator's job


class NextIsPlusOne(Stub):
    """For ids[t] = t mod V: predicts ids + 1 with a logit equal to the position in the window, so a token read
    with j earlier tokens in its window costs log(1 + (V - 1) e^-j) nats: more context, lower loss."""

    def logits(self, input_ids):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab_size)
        position = torch.arange(width, dtype=torch.float).expand(batch, width)
        logits.scatter_(2, ((input_ids + 1) % self.vocab_size).unsqueeze(-1), position.unsqueeze(-1))
        return logits


class KeepsLogits(NextIsPlusOne):
    """The same, with `logits_to_keep` as the package's causal LMs have it."""

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        self.calls.append({"shape": tuple(input_ids.shape), "keep": logits_to_keep})
        logits = self.logits(input_ids)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def expected_plus_one_nll(num_ids: int, seq_len: int, stride: int | None, vocab_size: int) -> float:
    total = 0.0
    for begin, end, score_from in eval_windows(num_ids, seq_len, stride):
        for token in range(score_from, end):
            j = token - 1 - begin  # the window position whose logits predict `token`
            total += math.log1p((vocab_size - 1) * math.exp(-j))
    return total


@pytest.mark.parametrize(("num_ids", "seq_len", "stride"), WINDOW_CASES)
def test_windows_score_every_token_once_with_the_promised_context(num_ids, seq_len, stride):
    windows = eval_windows(num_ids, seq_len, stride)
    scored = [t for _, end, score_from in windows for t in range(score_from, end)]
    assert scored == list(range(1, num_ids))
    effective = min(stride or seq_len, seq_len - 1)
    for index, (begin, end, score_from) in enumerate(windows):
        assert end - begin == min(seq_len, num_ids)
        assert score_from >= begin + 1  # every scored token has context
        if index > 0:
            assert score_from - begin >= seq_len - effective


def test_window_arguments():
    assert eval_windows(1, 4) == [] and eval_windows(0, 4) == []
    with pytest.raises(ValueError, match="stride=5"):
        eval_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride=0"):
        eval_windows(10, 4, 0)
    with pytest.raises(ValueError, match="seq_len=1"):
        eval_windows(10, 1)


@pytest.mark.parametrize(("num_ids", "seq_len", "stride"), WINDOW_CASES)
def test_uniform_model_costs_log_v_per_token(num_ids, seq_len, stride):
    model = Uniform(256)
    ids = torch.randint(0, 256, (num_ids,), generator=torch.Generator().manual_seed(0))
    nll, count = causal_lm_nll(model, ids, seq_len=seq_len, stride=stride, batch_size=3)
    assert count == num_ids - 1
    assert nll == pytest.approx(count * math.log(256), rel=1e-6)
    assert bits_per_character(nll, count) == pytest.approx(8.0, rel=1e-6)


def test_more_context_with_a_smaller_stride_and_exact_values():
    vocab, num_ids, seq_len = 11, 300, 16
    ids = torch.arange(num_ids) % vocab
    results = {}
    for stride in (None, 8, 4, 1):
        nll, count = causal_lm_nll(NextIsPlusOne(vocab), ids, seq_len=seq_len, stride=stride, batch_size=4)
        assert count == num_ids - 1
        assert nll == pytest.approx(expected_plus_one_nll(num_ids, seq_len, stride, vocab), rel=1e-5)
        results[stride] = nll
    assert results[None] > results[8] > results[4] > results[1]


@pytest.mark.parametrize("batch_size", [1, 2, 5, 1000])
def test_batch_size_and_logits_to_keep_do_not_change_the_result(batch_size):
    vocab, num_ids, seq_len, stride = 7, 203, 20, 6
    ids = torch.arange(num_ids) % vocab
    expected = causal_lm_nll(NextIsPlusOne(vocab), ids, seq_len=seq_len, stride=stride, batch_size=1)
    keeping = KeepsLogits(vocab)
    got = causal_lm_nll(keeping, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
    assert got[1] == expected[1] and got[0] == pytest.approx(expected[0], rel=1e-6)
    assert all(call["keep"] <= seq_len for call in keeping.calls)
    if batch_size == 1:
        assert [call["keep"] for call in keeping.calls[1:-1]] == [stride + 1] * (len(keeping.calls) - 2)


def test_mode_is_restored_and_short_inputs():
    model = Uniform(5)
    model.train()
    causal_lm_nll(model, torch.arange(10) % 5, seq_len=4)
    assert model.training and not any(call["training"] for call in model.calls)
    model.eval()
    causal_lm_nll(model, torch.arange(10) % 5, seq_len=4)
    assert not model.training
    assert causal_lm_nll(model, torch.tensor([3]), seq_len=4) == (0.0, 0)
    nll, count = causal_lm_nll(model, torch.tensor([1, 2, 3], dtype=torch.int32), seq_len=8)
    assert count == 2 and nll == pytest.approx(2 * math.log(5))
    with pytest.raises(ValueError, match="1-D"):
        causal_lm_nll(model, torch.zeros(2, 5, dtype=torch.long), seq_len=4)


def test_bits_and_perplexity():
    assert bits_per_character(10 * math.log(2), 10) == pytest.approx(1.0)
    assert perplexity_per_word(7 * math.log(5), 7) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_character(1.0, 0)
    with pytest.raises(ValueError, match="num_words"):
        perplexity_per_word(1.0, 0)


def test_causal_lm_metrics_per_unit():
    ids = torch.randint(0, 16, (100,), generator=torch.Generator().manual_seed(0))
    byte_corpus = Corpus(train=ids, valid=ids, test=ids, vocab_size=16, unit="byte",
                         words={"train": 1, "valid": 1, "test": 1})
    metrics = causal_lm_metrics(Uniform(16), byte_corpus, "valid", seq_len=10)
    assert metrics["tokens"] == 99 and metrics["bpc"] == pytest.approx(4.0) and "ppl" not in metrics
    token_corpus = Corpus(train=ids, valid=ids, test=ids, vocab_size=16, unit="token",
                          words={"train": 1, "valid": 1, "test": 99 // 3})
    metrics = causal_lm_metrics(Uniform(16), token_corpus, "test", seq_len=10, stride=5)
    assert metrics["loss"] == pytest.approx(math.log(16))
    assert metrics["ppl"] == pytest.approx(16.0**3)  # 3 tokens per word


class Oracle(Stub):
    """Knows the data: every row is 0, 1, 2, ... mod `period`, so position t's answer is t mod period."""

    def __init__(self, vocab_size: int, period: int):
        super().__init__(vocab_size)
        self.period = period

    def logits(self, input_ids):
        batch, width = input_ids.shape
        answers = (torch.arange(width) % self.period).expand(batch, width)
        return 50.0 * nn.functional.one_hot(answers, self.vocab_size).float()


def mlm_loader(vocab: int = 30, rows: int = 12, width: int = 40) -> DataLoader:
    ids = (torch.arange(width) % vocab).repeat(rows)
    collate = mlm_collator(None, vocab_size=vocab + 2, mask_token_id=vocab, special_token_ids=[vocab + 1], seed=0)
    return DataLoader(PackedBlocks(ids, width), batch_size=5, collate_fn=collate)


def test_masked_lm_metrics_of_an_oracle_and_a_uniform_model():
    loader = mlm_loader()
    masked = sum(int((batch["labels"] != -100).sum()) for batch in loader)
    assert masked > 0
    oracle = Oracle(32, period=30)
    oracle.train()
    metrics = masked_lm_metrics(oracle, loader)
    assert metrics["accuracy"] == 1.0 and metrics["masked_tokens"] == masked
    assert metrics["loss"] < 1e-6
    assert oracle.training and not any(call["training"] for call in oracle.calls)

    uniform = masked_lm_metrics(Uniform(32), loader)
    assert uniform["loss"] == pytest.approx(math.log(32), rel=1e-6)
    assert uniform["masked_tokens"] == masked
    first_batches = masked_lm_metrics(Uniform(32), loader, max_batches=1)
    assert first_batches["masked_tokens"] == int((next(iter(loader))["labels"] != -100).sum())


def test_masked_lm_metrics_passes_the_attention_mask_and_handles_no_masks():
    model = Uniform(8)
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "labels": torch.full((2, 3), -100),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    metrics = masked_lm_metrics(model, [batch])
    assert metrics["masked_tokens"] == 0 and math.isnan(metrics["loss"]) and math.isnan(metrics["accuracy"])
    assert model.calls[0]["attention_mask"].equal(batch["attention_mask"])


def test_with_a_real_causal_lm():
    """A tiny GPT-2 (no download): `logits_to_keep` changes nothing, and an untrained model is near log V."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    ids = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    nll, count = causal_lm_nll(model, ids, seq_len=32, stride=8, batch_size=4)

    class NoKeep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    full, full_count = causal_lm_nll(NoKeep(model), ids, seq_len=32, stride=8, batch_size=4)
    assert count == full_count == 149
    assert nll == pytest.approx(full, rel=1e-5)
    assert abs(nll / count - math.log(64)) < 0.5
