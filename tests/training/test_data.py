"""The corpora, tokenizers, packed blocks, resumable sampler and MLM collator of `subquadratic.training`."""

from __future__ import annotations

import os
import time
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader
from transformers import AutoTokenizer

from subquadratic.training import data as data_module
from subquadratic.training.data import (
    KNOWN_CORPORA,
    SPLITS,
    PackedBlocks,
    ResumableSampler,
    count_words_in_bytes,
    count_words_in_lines,
    load_corpus,
    mlm_collator,
    split_points,
)
from subquadratic.training.tokenizer import SPECIAL_TOKENS, byte_tokenizer, train_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ENWIK8 = FIXTURES / "enwik8" / "enwik8"
ENWIK8_ZIP = FIXTURES / "enwik8" / "enwik8.zip"
WIKITEXT = FIXTURES / "wikitext"


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the Hugging Face Hub."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_dataset{args} called")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def write_wikitext(folder: Path, splits: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in splits.items():
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return folder


# A WikiText-shaped corpus small enough to count by hand.
HAND_TRAIN = " \n = Cats = \n \n the cat sat on the mat . \n the dog sat . \n"
HAND_VALID = " \n the cat ran . \n"
HAND_TEST = " = Zebras = \n a zebra sat on the cat . \n"
# words + one per line end: train 5 lines: 0+3+0+7+4 = 14 words, 19; valid 2 lines: 0+4 = 4, 6;
# test 2 lines: 3+7 = 10, 12.
HAND_WORDS = {"train": 19, "valid": 6, "test": 12}


# ----------------------------------------------------------------------------------------------------- splitting

def test_split_points_standard_enwik8_and_proportions():
    assert split_points(100_000_000) == (90_000_000, 95_000_000)
    assert split_points(20_000) == (18_000, 19_000)
    assert split_points(0) == (0, 0)
    assert split_points(7) == (6, 6)  # rounded down: train 6, valid 0, test 1
    with pytest.raises(ValueError, match="total_len"):
        split_points(-1)


def test_count_words_in_bytes_matches_bytes_split():
    generator = torch.Generator().manual_seed(0)
    alphabet = torch.tensor(list(b"ab \t\n\r\x0b\x0cc\x1c\xa0\xc3"))
    for length in (0, 1, 2, 5, 100, 2000):
        ids = alphabet[torch.randint(len(alphabet), (length,), generator=generator)]
        assert count_words_in_bytes(ids) == len(bytes(ids.tolist()).split()), length
    for text in (b"", b"   ", b"a", b" a", b"a ", b" a b  c\n"):
        assert count_words_in_bytes(torch.tensor(list(text), dtype=torch.long)) == len(text.split())


def test_count_words_in_lines_counts_line_ends():
    assert count_words_in_lines([" = A = ", " ", "x y z ."]) == 3 + 1 + 0 + 1 + 4 + 1
    assert count_words_in_lines([]) == 0


# -------------------------------------------------------------------------------------------------- byte corpora

def test_enwik8_raw_zip_and_folder_give_identical_90_5_5_splits(no_hub):
    raw = ENWIK8.read_bytes()
    assert len(raw) == 20_000
    corpora = [load_corpus("enwik8", p) for p in (ENWIK8, ENWIK8_ZIP, str(ENWIK8_ZIP), ENWIK8.parent)]
    expected = {"train": raw[:18_000], "valid": raw[18_000:19_000], "test": raw[19_000:]}
    for corpus in corpora:
        assert (corpus.unit, corpus.vocab_size) == ("byte", 256)
        for split in SPLITS:
            ids = corpus.split(split)
            assert ids.dim() == 1 and ids.dtype == torch.long
            assert bytes(ids.tolist()) == expected[split]
            assert corpus.words[split] == len(expected[split].split())


def test_enwik8_zip_member_rules(tmp_path):
    single = tmp_path / "other.zip"
    with zipfile.ZipFile(single, "w") as archive:
        archive.writestr("some/name.txt", b"abc def\n" * 10)
    assert bytes(load_corpus("enwik8", single).train.tolist()) == (b"abc def\n" * 10)[:72]
    several = tmp_path / "several.zip"
    with zipfile.ZipFile(several, "w") as archive:
        archive.writestr("a", b"x")
        archive.writestr("b", b"y")
    with pytest.raises(ValueError, match="none named enwik8"):
        load_corpus("enwik8", several)


def test_tiny_shakespeare_is_the_bundled_text_split_90_5_5(no_hub):
    text = resources.files("subquadratic.training").joinpath("data/tiny_shakespeare.txt").read_bytes()
    corpus = load_corpus("tiny_shakespeare")
    train_end, valid_end = split_points(len(text))
    assert bytes(corpus.train.tolist()) == text[:train_end]
    assert bytes(corpus.valid.tolist()) == text[train_end:valid_end]
    assert bytes(corpus.test.tolist()) == text[valid_end:]
    assert corpus.tokenizer.decode(corpus.valid[:200].tolist()) == text[train_end:train_end + 200].decode()
    assert load_corpus("tiny_shakespeare", "ignored/path").train.equal(corpus.train)


def test_text_corpus_is_byte_level(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("héllo wörld\n" * 50, encoding="utf-8")
    corpus = load_corpus("text", file)
    raw = file.read_bytes()
    assert bytes(torch.cat([corpus.train, corpus.valid, corpus.test]).tolist()) == raw
    assert len(corpus.train) == len(raw) * 90 // 100
    assert sum(corpus.words.values()) >= 100


def test_enwik8_from_the_hub_joins_lines(monkeypatch):
    import datasets

    raw = ENWIK8.read_bytes().decode("utf-8")
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": raw.split("\n")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for path in (None, "LTCB/enwik8", "hf://datasets/LTCB/enwik8"):
        corpus = load_corpus("enwik8", path)
        assert bytes(torch.cat([corpus.train, corpus.valid, corpus.test]).tolist()) == raw.encode()
        assert corpus.source == "hf://datasets/LTCB/enwik8"
    assert calls == [("LTCB/enwik8", None, "train")] * 3


def test_wikitext_from_the_hub(monkeypatch):
    import datasets

    calls = []
    splits = {"train": HAND_TRAIN, "validation": HAND_VALID, "test": HAND_TEST}

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        # Rows as the hub has them: one per line, with its newline; blank lines empty.
        return datasets.DatasetDict({
            split: datasets.Dataset.from_dict({"text": [line + "\n" if line.strip() else ""
                                                        for line in text.split("\n")[:-1]]})
            for split, text in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("wikitext-103")
    assert calls == [("Salesforce/wikitext", "wikitext-103-v1")]
    assert corpus.words == HAND_WORDS
    load_corpus("wikitext-2")
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-v1")


# --------------------------------------------------------------------------------------------------------- errors

def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_corpus("enwik9")
    for name in KNOWN_CORPORA:
        assert name in str(error.value)


def test_missing_files_and_folders_fail_fast_with_clear_errors(tmp_path, no_hub):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="nowhere/enwik8"):
        load_corpus("enwik8", tmp_path / "nowhere" / "enwik8")
    with pytest.raises(FileNotFoundError, match="enwik8 or enwik8.zip"):
        load_corpus("enwik8", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens, wiki\.valid\.tokens, wiki\.test\.tokens"):
        load_corpus("wikitext-103", tmp_path / "missing")
    partial = write_wikitext(tmp_path / "partial", {"train": HAND_TRAIN})
    with pytest.raises(FileNotFoundError, match=r"in .*partial; missing wiki\.valid\.tokens, wiki\.test\.tokens"):
        load_corpus("wikitext-2", partial)
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        load_corpus("text", tmp_path / "no-such.txt")
    with pytest.raises(ValueError, match="needs path"):
        load_corpus("text")
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_corpus("wikitext-2", WIKITEXT, tokenizer_path=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match="byte-level"):
        load_corpus("enwik8", ENWIK8, vocab_size=1000)
    with pytest.raises(ValueError, match="byte-level"):
        load_corpus("tiny_shakespeare", tokenizer_path=str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer_kind"):
        load_corpus("wikitext-2", WIKITEXT, tokenizer_kind="unigram")
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------------------- WikiText

def test_wikitext_hand_counted(tmp_path, no_hub):
    folder = write_wikitext(tmp_path / "wt", {"train": HAND_TRAIN, "valid": HAND_VALID, "test": HAND_TEST})
    corpus = load_corpus("wikitext-103", folder)
    tokenizer = corpus.tokenizer
    assert corpus.unit == "token"
    assert corpus.words == HAND_WORDS
    # Word-level: one id per word and one <eos> per line end.
    assert {s: len(corpus.split(s)) for s in SPLITS} == HAND_WORDS
    train_words = set(HAND_TRAIN.split())
    assert set(tokenizer.get_vocab()) == set(SPECIAL_TOKENS) | train_words
    assert corpus.vocab_size == len(tokenizer) == len(SPECIAL_TOKENS) + len(train_words)
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == list(SPECIAL_TOKENS)
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    # valid " \n the cat ran . \n": <eos> the cat <unk> . <eos> ("ran" is not in train)
    assert corpus.valid.tolist() == [eos, *tokenizer.convert_tokens_to_ids(["the", "cat"]), unk,
                                     tokenizer.convert_tokens_to_ids("."), eos]
    # test: "Zebras", "a", "zebra" are test-only words.
    assert tokenizer.decode(corpus.test.tolist()) == "= <unk> = <eos> <unk> <unk> sat on the cat . <eos>"


def test_wikitext_fixture_tokenizer_is_trained_on_train_only(tmp_path, no_hub):
    corpus = load_corpus("wikitext-2", WIKITEXT)
    tokenizer = corpus.tokenizer
    lines = {s: (WIKITEXT / f"wiki.{s}.tokens").read_text(encoding="utf-8").split("\n")[:-1] for s in SPLITS}
    assert corpus.words == {s: count_words_in_lines(lines[s]) for s in SPLITS}
    assert {s: len(corpus.split(s)) for s in SPLITS} == corpus.words
    train_words = {w for line in lines["train"] for w in line.split()}
    test_only = sorted({w for line in lines["test"] for w in line.split()} - train_words)
    assert "Kiss" in test_only and len(test_only) > 50
    assert not set(test_only) & set(tokenizer.get_vocab())
    assert set(tokenizer.convert_tokens_to_ids(test_only)) == {tokenizer.unk_token_id}
    # <unk> ids: the test-only words and WikiText's own literal "<unk>" words.
    unknown = sum(len([w for w in line.split() if w not in train_words or w == "<unk>"]) for line in lines["test"])
    assert int((corpus.test == tokenizer.unk_token_id).sum()) == unknown
    assert int((corpus.test == tokenizer.eos_token_id).sum()) == len(lines["test"])

    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(reloaded) == len(tokenizer)
    for line in lines["test"][:20] + lines["train"][:20]:
        assert reloaded.encode(line, add_special_tokens=False) == tokenizer.encode(line, add_special_tokens=False)
    for attribute in ("unk_token_id", "pad_token_id", "mask_token_id", "eos_token_id"):
        assert getattr(reloaded, attribute) == getattr(tokenizer, attribute)
    # And the corpus built from the saved tokenizer is the same.
    again = load_corpus("wikitext-2", WIKITEXT, tokenizer_path=str(tmp_path / "tok"))
    for split in SPLITS:
        assert again.split(split).equal(corpus.split(split))
    # A saved tokenizer decides the vocabulary: vocab_size and tokenizer_kind (for training one) are not used.
    loaded = load_corpus("wikitext-2", WIKITEXT, tokenizer_path=str(tmp_path / "tok"), vocab_size=100,
                         tokenizer_kind="bpe")
    assert loaded.vocab_size == len(tokenizer) and loaded.test.equal(corpus.test)


def test_word_vocab_size_keeps_the_most_frequent_words(no_hub):
    corpus = load_corpus("wikitext-2", WIKITEXT, vocab_size=50)
    assert corpus.vocab_size == len(corpus.tokenizer) == 50
    for word in ("the", ",", ".", "of"):
        assert corpus.tokenizer.convert_tokens_to_ids(word) != corpus.tokenizer.unk_token_id


def test_bpe_option(tmp_path, no_hub):
    corpus = load_corpus("wikitext-2", WIKITEXT, tokenizer_kind="bpe", vocab_size=400)
    tokenizer = corpus.tokenizer
    assert corpus.vocab_size == len(tokenizer) == 400
    assert corpus.words == load_corpus("wikitext-2", WIKITEXT).words  # words do not depend on the tokenizer
    assert len(corpus.test) > corpus.words["test"]  # subwords
    assert int((corpus.test == tokenizer.unk_token_id).sum()) > 0  # the literal <unk> words of WikiText
    line = "The zebra ( Equus quagga ) sat on the mat ."
    assert tokenizer.decode(tokenizer.encode(line)).strip() == line
    tokenizer.save_pretrained(tmp_path / "bpe")
    assert AutoTokenizer.from_pretrained(tmp_path / "bpe").encode(line) == tokenizer.encode(line)


def test_train_tokenizer_arguments():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["a b"], kind="chars")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], kind="word", vocab_size=3)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], kind="bpe", vocab_size=100)


def test_cache_reuses_tokenized_splits(tmp_path, monkeypatch):
    folder = write_wikitext(tmp_path / "wt", {"train": HAND_TRAIN, "valid": HAND_VALID, "test": HAND_TEST})
    cache = tmp_path / "cache"
    first = load_corpus("wikitext-103", folder, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer trained again")

    monkeypatch.setattr(data_module, "train_tokenizer", refuse)
    second = load_corpus("wikitext-103", folder, cache_dir=cache)
    for split in SPLITS:
        assert second.split(split).equal(first.split(split)) and second.split(split).dtype == torch.long
    assert second.words == first.words and second.vocab_size == first.vocab_size
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    monkeypatch.undo()

    load_corpus("wikitext-103", folder, cache_dir=cache, vocab_size=6)  # another key
    train = folder / "wiki.train.tokens"
    train.write_text(HAND_TRAIN + " a zebra . \n", encoding="utf-8")
    os.utime(train, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_corpus("wikitext-103", folder, cache_dir=cache)  # the file changed: another key
    assert "zebra" in changed.tokenizer.get_vocab()
    assert len([p for p in cache.iterdir() if ".tmp-" not in p.name]) == 3


# ------------------------------------------------------------------------------------------------ byte tokenizer

@pytest.mark.parametrize("text", ["Hello, world!\n\tThe <page> & 'quotes' ~ \x00\x7f",
                                  "héllo wörld — naïve 日本語 🙂 \u00a0 Ωμέγα"])
def test_byte_tokenizer_ids_are_the_bytes(text, tmp_path):
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path / "bytes")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "bytes")
    assert reloaded.encode(text) == ids and reloaded.decode(ids) == text
    assert (reloaded.mask_token_id, reloaded.pad_token_id, len(reloaded)) == (256, 257, 258)


def test_byte_tokenizer_covers_every_byte():
    tokenizer = byte_tokenizer()
    assert (tokenizer.mask_token_id, tokenizer.pad_token_id, len(tokenizer)) == (256, 257, 258)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(258))
    assert tokenizer.decode([104, 256, 105], skip_special_tokens=True) == "hi"


# -------------------------------------------------------------------------------------------------- PackedBlocks

def test_packed_blocks():
    ids = torch.arange(23, dtype=torch.int32)
    blocks = PackedBlocks(ids, block_size=5)
    assert len(blocks) == 4  # 20 ids used, the last 3 dropped
    item = blocks[2]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == [10, 11, 12, 13, 14]
    assert item["labels"].tolist() == item["input_ids"].tolist()
    item["input_ids"][0] = -1  # items are copies: neither the labels nor the corpus change
    assert item["labels"][0] == 10 and ids[10] == 10
    assert blocks[-1]["input_ids"].tolist() == [15, 16, 17, 18, 19]
    batch = next(iter(DataLoader(blocks, batch_size=3)))
    assert batch["input_ids"].shape == (3, 5)
    with pytest.raises(IndexError):
        blocks[4]
    with pytest.raises(ValueError, match="block_size=24"):
        PackedBlocks(ids, block_size=24)
    with pytest.raises(ValueError, match="1-D"):
        PackedBlocks(ids.view(1, -1), block_size=5)


# ---------------------------------------------------------------------------------------------- ResumableSampler

def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(100, seed=1), ResumableSampler(100, seed=1)
    first = list(a)
    assert sorted(first) == list(range(100))
    assert first == list(b)
    assert a.state_dict() == {"epoch": 1, "position": 0}
    second = list(a)
    assert second != first and sorted(second) == list(range(100))
    assert second == ResumableSampler(100, seed=1).order(epoch=1)
    assert list(ResumableSampler(100, seed=2)) != first
    assert ResumableSampler(100, seed=0).order(1) != ResumableSampler(100, seed=1).order(0)  # not seed + epoch
    assert len(a) == 100


@pytest.mark.parametrize("stop", [0, 1, 37, 99, 100])
def test_sampler_resumes_exactly(stop):
    sampler = ResumableSampler(100, seed=3)
    list(sampler)  # epoch 0 done
    full = sampler.order()
    iterator = iter(sampler)
    seen = [next(iterator) for _ in range(stop)]
    state = sampler.state_dict()
    assert state == {"epoch": 1, "position": stop}
    resumed = ResumableSampler(100, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    if stop < 100:
        assert seen + rest == full
    else:  # the epoch was drawn to its end: resuming starts the next one
        assert seen == full and rest == resumed.order(2)
    assert resumed.state_dict() == {"epoch": 2 if stop < 100 else 3, "position": 0}

    other = ResumableSampler(100, seed=3)
    other.epoch = 1
    other.set_position(stop)
    assert list(other) == rest
    with pytest.raises(ValueError, match="position"):
        other.set_position(101)


def test_sampler_through_dataloader_and_accelerate():
    from accelerate import Accelerator
    from accelerate.data_loader import BatchSamplerShard

    dataset = PackedBlocks(torch.arange(40 * 4), block_size=4)  # item i holds 4i .. 4i+3
    sampler = ResumableSampler(len(dataset), seed=5)
    loader = Accelerator(cpu=True).prepare(DataLoader(dataset, batch_size=8, sampler=sampler))
    epoch0 = [i for batch in loader for i in (batch["input_ids"][:, 0] // 4).tolist()]
    assert epoch0 == sampler.order(0)
    epoch1 = [i for batch in loader for i in (batch["input_ids"][:, 0] // 4).tolist()]
    assert epoch1 == sampler.order(1)

    # A resumed epoch survives accelerate's set_epoch calls (the sampler has no set_epoch to call).
    resumed = ResumableSampler(len(dataset), seed=5)
    resumed.load_state_dict({"epoch": 7, "position": 16})
    loader = Accelerator(cpu=True).prepare(DataLoader(dataset, batch_size=8, sampler=resumed))
    rest = [i for batch in loader for i in (batch["input_ids"][:, 0] // 4).tolist()]
    assert rest == resumed.order(7)[16:]

    # Two processes: each draws the same sequence; process k gets batches k, k + 2, ...
    order = ResumableSampler(len(dataset), seed=5).order(0)
    batches = [order[i:i + 8] for i in range(0, 40, 8)]
    for process in (0, 1):
        shard = BatchSamplerShard(BatchSampler(ResumableSampler(len(dataset), seed=5), 8, drop_last=False),
                                  num_processes=2, process_index=process)
        got = list(shard)
        assert got[:2] == batches[process::2][:2]
        assert len(got) == len(shard) == 3  # 5 batches, evened to 6 by looping back to the start


# ------------------------------------------------------------------------------------------------- MLM collator

def byte_items(rows: int, length: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, length), generator=generator)
    ids[:, ::50] = 257  # some specials in the input: never chosen
    ids[:, 1::50] = 256
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def test_mlm_collator_bert_proportions():
    items = byte_items(64, 1000)
    original = torch.stack([item["input_ids"] for item in items])
    collate = mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256, 257], seed=0)
    batch = collate(items)
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert set(batch) == {"input_ids", "labels"}
    special = original >= 256
    chosen = labels != -100
    assert not (chosen & special).any()
    assert input_ids[special].equal(original[special])
    assert labels[chosen].equal(original[chosen])
    assert input_ids[~chosen].equal(original[~chosen])
    fraction = chosen.sum() / (~special).sum()
    assert abs(fraction - 0.15) < 0.01
    masked = chosen & (input_ids == 256)
    kept = chosen & (input_ids == original)
    randomised = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(randomised.sum() / n - 0.1) < 0.02  # a random byte equal to the original counts as kept (1/256)
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert (input_ids[randomised] < 256).all()
    # Deterministic with a seed (and depending only on the batch), different with another seed.
    again = mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256, 257], seed=0)(items)
    assert again["input_ids"].equal(input_ids) and again["labels"].equal(labels)
    other = mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256, 257], seed=1)(items)
    assert not other["labels"].equal(labels)
    assert not collate(byte_items(64, 1000, seed=1))["labels"].eq(-100).equal(labels.eq(-100))


def test_mlm_collator_never_draws_special_random_tokens():
    # A vocabulary of 6 with specials 0, 1, 2: random replacements come from 3, 4, 5 only.
    items = [{"input_ids": torch.tensor([3, 4, 5, 0, 1, 2] * 200)} for _ in range(20)]
    collate = mlm_collator(None, vocab_size=6, mask_token_id=2, special_token_ids=[0, 1], seed=0,
                           mlm_probability=0.5, mask_replace_prob=0.0, random_replace_prob=1.0)
    batch = collate(items)
    chosen = batch["labels"] != -100
    assert chosen.any()
    assert set(batch["input_ids"][chosen].tolist()) == {3, 4, 5}
    assert (batch["labels"][chosen] >= 3).all()


def test_mlm_collator_with_a_tokenizer_and_padding(no_hub):
    corpus = load_corpus("wikitext-2", WIKITEXT)
    tokenizer = corpus.tokenizer
    collate = mlm_collator(tokenizer, vocab_size=corpus.vocab_size, mask_token_id=tokenizer.mask_token_id,
                           special_token_ids=[], seed=0, mlm_probability=0.5)
    loader = DataLoader(PackedBlocks(corpus.train, 64), batch_size=16, collate_fn=collate)
    batch = next(iter(loader))
    specials = torch.tensor(tokenizer.all_special_ids)
    original = torch.stack([PackedBlocks(corpus.train, 64)[i]["input_ids"] for i in range(16)])
    chosen = batch["labels"] != -100
    assert chosen.any() and not (chosen & torch.isin(original, specials)).any()  # <eos>, <unk> never chosen

    ragged = [{"input_ids": torch.tensor([10, 11, 12, 13])}, {"input_ids": torch.tensor([20, 21])}]
    batch = collate(ragged)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"][1, 2:].tolist() == [tokenizer.pad_token_id] * 2
    assert (batch["labels"][1, 2:] == -100).all()
    with pytest.raises(ValueError, match="pad_token_id"):
        mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256])(ragged)


def test_mlm_collator_arguments():
    with pytest.raises(ValueError, match="mlm_probability"):
        mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[], mlm_probability=0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mlm_collator(None, vocab_size=256, mask_token_id=256, special_token_ids=[])
    with pytest.raises(ValueError, match="sum to at most 1"):
        mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[], mask_replace_prob=0.95)


def test_mlm_masks_do_not_depend_on_dataloader_workers():
    dataset = PackedBlocks(torch.arange(4000) % 256, block_size=100)
    collate = mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256, 257], seed=3)

    def run(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=4, sampler=ResumableSampler(len(dataset), seed=0),
                            collate_fn=collate, num_workers=workers)
        return [batch["labels"] for batch in loader]

    single, parallel = run(0), run(2)
    assert len(single) == len(parallel) == 10
    assert all(a.equal(b) for a, b in zip(single, parallel))
    assert not single[0].eq(-100).equal(single[1].eq(-100))
