"""Language-modelling corpora and the pieces that feed them to a training loop.

    corpus = load_corpus("enwik8", "data/enwik8.zip")          # bytes: 90M / 5M / 5M
    corpus = load_corpus("wikitext-103", "data/wikitext-103")  # words, tokenizer trained on train
    train = PackedBlocks(corpus.train, block_size=1024)
    sampler = ResumableSampler(len(train), seed=0)
    loader = DataLoader(train, batch_size=8, sampler=sampler)  # then accelerator.prepare(loader)
    collate = mlm_collator(None, vocab_size=258, mask_token_id=256, special_token_ids=[256, 257], seed=0)

Corpora (`load_corpus(name, path)`; `path=None` or `"hf://datasets/OWNER/NAME"` loads from the Hugging Face Hub):

    enwik8            byte-level; path: the raw 10^8-byte file, `enwik8.zip`, or a folder holding either.
    wikitext-103      word-level (or BPE); path: a folder with wiki.{train,valid,test}.tokens.
    wikitext-2        as wikitext-103.
    text              byte-level; path: any local text file.
    tiny_shakespeare  byte-level; the 64 KiB bundled with the package (path ignored); the built-in default.

Byte corpora are split 90% / 5% / 5% in file order, which for enwik8's 10^8 bytes is the standard
90,000,000 / 5,000,000 / 5,000,000 split (`split_points`)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tokenizer import TOKENIZER_KINDS, byte_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPLITS = ("train", "valid", "test")
BYTE_CORPORA = ("enwik8", "text", "tiny_shakespeare")
TOKEN_CORPORA = ("wikitext-103", "wikitext-2")
KNOWN_CORPORA = BYTE_CORPORA + TOKEN_CORPORA
# Hub dataset and config behind each corpus that has one.
HUB_DATASETS = {"enwik8": ("LTCB/enwik8", None),
                "wikitext-103": ("Salesforce/wikitext", "wikitext-103-v1"),
                "wikitext-2": ("Salesforce/wikitext", "wikitext-2-v1")}
WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
ENWIK8_BYTES = 10**8
# What Python's `bytes.split()` treats as whitespace: space, \t, \n, \v, \f, \r.
ASCII_WHITESPACE = (9, 10, 11, 12, 13, 32)
CACHE_FORMAT = 1


@dataclass
class Corpus:
    """The three splits of a corpus as 1-D int64 id tensors, and what is needed to score them."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    unit: str  # "byte" or "token"
    words: dict[str, int]  # whitespace-separated words of each split's original text (see `load_corpus`)
    tokenizer: PreTrainedTokenizerFast | None = field(default=None, repr=False)
    name: str = ""
    source: str = ""  # the file, folder or hub dataset it was read from

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split={name!r}: expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def summary(self) -> str:
        sizes = " / ".join(f"{s} {len(self.split(s)):,}" for s in SPLITS)
        return (f"{self.name} ({self.unit}s, vocabulary {self.vocab_size:,}) from {self.source}: "
                f"{sizes} {self.unit}s")


# --------------------------------------------------------------------------------------------- splitting, counting

def split_points(total_len: int) -> tuple[int, int]:
    """(end of train, end of valid) for a 90% / 5% / 5% split of `total_len` units: (90_000_000, 95_000_000) for
    enwik8's 10^8 bytes, the standard split; the same proportions, rounded down, for any other length."""
    if total_len < 0:
        raise ValueError(f"total_len={total_len}: must be >= 0")
    return total_len * 90 // 100, total_len * 95 // 100


def split_bytes(data: bytes) -> dict[str, bytes]:
    train_end, valid_end = split_points(len(data))
    return {"train": data[:train_end], "valid": data[train_end:valid_end], "test": data[valid_end:]}


def count_words_in_bytes(ids: torch.Tensor) -> int:
    """Number of whitespace-separated words of a byte tensor, as `len(data.split())` counts them (ASCII
    whitespace), without building the words: a word starts at each non-space byte after a space or the start."""
    if len(ids) == 0:
        return 0
    is_space = torch.isin(ids, torch.tensor(ASCII_WHITESPACE, dtype=ids.dtype))
    return int(~is_space[0]) + int((~is_space[1:] & is_space[:-1]).sum())


def count_words_in_lines(lines: Sequence[str]) -> int:
    """Words of `lines` for per-word perplexity, the standard word-level WikiText convention: the
    whitespace-separated words of every line plus one for each line end (the `<eos>` token), blank lines included
    (WikiText-103 test: 241,211 words + 4,358 lines = 245,569)."""
    return sum(len(line.split()) + 1 for line in lines)


def _bytes_to_ids(data: bytes) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


# ------------------------------------------------------------------------------------------------------ sources

def _hub_source(name: str, path: str | os.PathLike | None) -> str | None:
    """The hub dataset id if `path` names one for this corpus, else None (a local path)."""
    if name not in HUB_DATASETS:
        return None
    if path is None:
        return HUB_DATASETS[name][0]
    text = str(path)
    if text.startswith("hf://"):
        return text.removeprefix("hf://").removeprefix("datasets/")
    if text == HUB_DATASETS[name][0] and not os.path.exists(text):
        return text
    return None


def _enwik8_file(path: Path) -> Path:
    if path.is_dir():
        for candidate in ("enwik8", "enwik8.zip"):
            if (path / candidate).is_file():
                return path / candidate
        raise FileNotFoundError(f"expected the file enwik8 or enwik8.zip in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"enwik8: {path} does not exist; expected the raw enwik8 file (10^8 bytes), "
                                f"enwik8.zip, or a folder holding either (or path=None to load LTCB/enwik8 from "
                                f"the Hugging Face Hub)")
    return path


def _wikitext_files(path: Path) -> dict[str, Path]:
    expected = ", ".join(WIKITEXT_FILES.values())
    if not path.is_dir():
        raise FileNotFoundError(f"wikitext: the folder {path} does not exist; expected {expected} in it "
                                f"(or path=None to load Salesforce/wikitext from the Hugging Face Hub)")
    files = {split: path / filename for split, filename in WIKITEXT_FILES.items()}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"expected {expected} in {path}; missing {', '.join(missing)}")
    return files


def _read_enwik8(path: Path) -> bytes:
    """The raw file, or the single member (preferably named "enwik8") of a zip archive."""
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if not m.endswith("/")]
        named = [m for m in members if m.rsplit("/", 1)[-1] == "enwik8"]
        if named:
            return archive.read(named[0])
        if len(members) == 1:
            return archive.read(members[0])
        raise ValueError(f"{path}: a zip archive with {len(members)} files and none named enwik8")


def _hub_enwik8(dataset_id: str) -> bytes:
    """LTCB/enwik8 holds the file's lines (without their "\\n"): join them back. If that leaves one byte short of
    10^8 the file's final newline was lost with the last line; put it back."""
    from datasets import load_dataset

    lines = load_dataset(dataset_id, split="train")["text"]
    data = "\n".join(lines).encode("utf-8")
    return data + b"\n" if len(data) == ENWIK8_BYTES - 1 else data


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file split on "\\n" only (WikiText has other Unicode line separators inside lines)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the piece after the final newline
    return lines


def _hub_wikitext_lines(dataset_id: str, config: str | None) -> dict[str, list[str]]:
    """One dataset row per line of the original files (blank lines are empty rows)."""
    from datasets import load_dataset

    dataset = load_dataset(dataset_id, config)
    return {split: list(dataset[hub_split]["text"])
            for split, hub_split in zip(SPLITS, ("train", "validation", "test"))}


# ------------------------------------------------------------------------------------------------------ corpora

def _byte_corpus(name: str, data: bytes, source: str) -> Corpus:
    ids = {split: _bytes_to_ids(part) for split, part in split_bytes(data).items()}
    words = {split: count_words_in_bytes(split_ids) for split, split_ids in ids.items()}
    return Corpus(**ids, vocab_size=256, unit="byte", words=words, tokenizer=byte_tokenizer(), name=name,
                  source=source)


def _eos_id(tokenizer, where: str) -> int:
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer from {where} has no eos_token (nor sep_token): WikiText line ends are "
                     f"encoded with it")


def encode_lines(tokenizer, lines: Sequence[str], eos_id: int, *, chunk_lines: int = 10_000) -> torch.Tensor:
    """The ids of `lines` (each stripped of surrounding whitespace) with `eos_id` after every line, blank lines
    included: a word-level tokenizer gives exactly `count_words_in_lines(lines)` ids. No other special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pieces = []
    for start in range(0, len(lines), chunk_lines):
        batch = [line.strip() for line in lines[start:start + chunk_lines]]
        if backend is not None:
            encoded = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat: list[int] = []
        for ids in encoded:
            flat.extend(ids)
            flat.append(eos_id)
        pieces.append(torch.tensor(flat, dtype=torch.int32))  # int32 halves the peak memory of WikiText-103
    return torch.cat(pieces).to(torch.long) if pieces else torch.zeros(0, dtype=torch.long)


def _cache_dir_for(cache_dir: str | os.PathLike, name: str, parts: list) -> Path:
    key = hashlib.sha256(repr((CACHE_FORMAT, name, *parts)).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"{name}-{key}"


def _file_stamp(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _load_cached(folder: Path, name: str, source: str) -> Corpus | None:
    from transformers import AutoTokenizer

    if not (folder / "splits.pt").is_file():
        return None
    saved = torch.load(folder / "splits.pt", weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    return Corpus(**{s: saved[s].to(torch.long) for s in SPLITS}, vocab_size=saved["vocab_size"], unit="token",
                  words=dict(saved["words"]), tokenizer=tokenizer, name=name, source=source)


def _save_cached(folder: Path, corpus: Corpus) -> None:
    """Written to a temporary folder, then renamed: a reader never sees half a cache, and when two processes race
    the first rename wins (call `load_corpus` under `accelerator.main_process_first()` to tokenize once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    corpus.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    torch.save({**{s: corpus.split(s).to(torch.int32) for s in SPLITS}, "vocab_size": corpus.vocab_size,
                "words": corpus.words}, tmp / "splits.pt")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _token_corpus(name: str, path: str | os.PathLike | None, vocab_size: int | None, tokenizer_path: str | None,
                  tokenizer_kind: str, cache_dir: str | os.PathLike | None) -> Corpus:
    from transformers import AutoTokenizer

    # Everything that can be wrong with the arguments is checked before any reading or training.
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer_kind={tokenizer_kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
    hub_id = _hub_source(name, path)
    files = None if hub_id is not None else _wikitext_files(Path(path).expanduser())
    if tokenizer_path is not None and not Path(tokenizer_path).expanduser().is_dir():
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path}: no such folder; expected a tokenizer saved "
                                f"with save_pretrained (tokenizer.json, tokenizer_config.json)")
    source = f"hf://datasets/{hub_id}" if hub_id is not None else str(Path(path).expanduser())

    cache_folder = None
    if cache_dir is not None:
        stamps = [hub_id, HUB_DATASETS[name][1]] if files is None else [_file_stamp(f) for f in files.values()]
        tokenizer_stamp = None
        if tokenizer_path is not None:
            tokenizer_stamp = [_file_stamp(f) for f in sorted(Path(tokenizer_path).expanduser().glob("*.json"))]
        trained = None if tokenizer_path is not None else (tokenizer_kind, vocab_size)
        cache_folder = _cache_dir_for(cache_dir, name, [stamps, trained, tokenizer_stamp])
        cached = _load_cached(cache_folder, name, source)
        if cached is not None:
            return cached

    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tokenizer_path).expanduser()))
        eos_id = _eos_id(tokenizer, tokenizer_path)
    if files is None:
        lines = _hub_wikitext_lines(hub_id, HUB_DATASETS[name][1] if hub_id == HUB_DATASETS[name][0] else None)
    else:
        lines = {split: _read_lines(f) for split, f in files.items()}
    if tokenizer_path is None:
        tokenizer = train_tokenizer(lines["train"], tokenizer_kind, vocab_size)  # train split only
        eos_id = _eos_id(tokenizer, "train_tokenizer")
    corpus = Corpus(**{split: encode_lines(tokenizer, lines[split], eos_id) for split in SPLITS},
                    vocab_size=len(tokenizer), unit="token",
                    words={split: count_words_in_lines(lines[split]) for split in SPLITS}, tokenizer=tokenizer,
                    name=name, source=source)
    if cache_folder is not None:
        _save_cached(cache_folder, corpus)
    return corpus


def load_corpus(name: str, path: str | os.PathLike | None = None, *, vocab_size: int | None = None,
                tokenizer_path: str | None = None, cache_dir: str | os.PathLike | None = None,
                tokenizer_kind: str = "word") -> Corpus:
    """Load a corpus by name (see the module docstring) as a `Corpus` of 1-D int64 id tensors.

    Byte corpora ("enwik8", "text", "tiny_shakespeare"): ids are the raw byte values, `vocab_size` 256, split
    90% / 5% / 5% in file order (the standard 90M / 5M / 5M for enwik8); `tokenizer` is `byte_tokenizer()` (which
    adds `<mask>` = 256 and `<pad>` = 257 for byte-level MLM). `vocab_size` and `tokenizer_path` do not apply.
    `words` counts ASCII-whitespace-separated words of each split's bytes (a word cut by a split boundary counts
    in both).

    WikiText ("wikitext-103", "wikitext-2", the "tokens" version): every line, blank ones included, is stripped,
    tokenized, and followed by `<eos>` (so a split is its lines joined with `<eos>` between them, plus one at the
    end). The tokenizer is trained on the train split only, with `tokenizer_kind` "word" (its words: all of them
    when `vocab_size` is None, as in the papers, else the `vocab_size` most frequent, specials included) or "bpe"
    (byte-level BPE, `vocab_size` default 32000), unless `tokenizer_path` names a saved one; then
    `tokenizer_kind` and `vocab_size` are not used and `Corpus.vocab_size` is the loaded tokenizer's size.
    `words` counts each line's whitespace-separated words plus one per line end (the standard count: 245,569 for
    the WikiText-103 test split), so for a word-level tokenizer it equals the number of ids.

    `path=None` (or "hf://datasets/OWNER/NAME", or the default hub id) loads the hub dataset with
    `datasets.load_dataset`. `cache_dir`: WikiText splits and their tokenizer are cached there, keyed by the name,
    the files' path, size and modification time, `tokenizer_kind` and `vocab_size`, or the tokenizer_path files.

    A missing file or folder raises FileNotFoundError and an unknown name ValueError, before anything is read."""
    if name not in KNOWN_CORPORA:
        raise ValueError(f"unknown corpus {name!r}: expected one of {', '.join(KNOWN_CORPORA)}")
    if name in TOKEN_CORPORA:
        return _token_corpus(name, path, vocab_size, tokenizer_path, tokenizer_kind, cache_dir)

    if vocab_size not in (None, 256):
        raise ValueError(f"vocab_size={vocab_size}: corpus {name!r} is byte-level, its vocabulary is the 256 byte "
                         f"values (leave vocab_size out)")
    if tokenizer_path is not None:
        raise ValueError(f"tokenizer_path={tokenizer_path!r}: corpus {name!r} is byte-level and takes no "
                         f"tokenizer")
    if name == "tiny_shakespeare":
        resource = resources.files("subquadratic.training").joinpath("data/tiny_shakespeare.txt")
        return _byte_corpus(name, resource.read_bytes(), "the bundled tiny_shakespeare.txt")
    if name == "enwik8":
        hub_id = _hub_source(name, path)
        if hub_id is not None:
            return _byte_corpus(name, _hub_enwik8(hub_id), f"hf://datasets/{hub_id}")
        file = _enwik8_file(Path(path).expanduser())
        return _byte_corpus(name, _read_enwik8(file), str(file))
    # name == "text"
    if path is None:
        raise ValueError("corpus 'text' needs path=, a local text file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"text: {file} does not exist or is not a file; expected a UTF-8 text file")
    return _byte_corpus(name, file.read_bytes(), str(file))


# ---------------------------------------------------------------------------------------------- datasets, samplers

class PackedBlocks(torch.utils.data.Dataset):
    """Contiguous non-overlapping blocks of `block_size` ids from a 1-D id tensor (the tail that does not fill a
    block is dropped). Item i -> {"input_ids": LongTensor(block_size), "labels": the same ids (a copy)}; a causal
    LM shifts the labels inside its loss."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if ids.dim() != 1:
            raise ValueError(f"ids: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        if block_size <= 0:
            raise ValueError(f"block_size={block_size}: must be positive")
        num_blocks = len(ids) // block_size
        if num_blocks == 0:
            raise ValueError(f"block_size={block_size} is longer than the {len(ids)} ids: no block fits")
        self.block_size = block_size
        self.blocks = ids[:num_blocks * block_size].view(num_blocks, block_size)  # a view: no copy of the corpus

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index].to(torch.long, copy=True)
        return {"input_ids": block, "labels": block.clone()}


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed per (seed, epoch), so that no two (seed, epoch) pairs share an order (seed + epoch would)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices whose order depends only on (seed, epoch), so every process of a distributed run draws the
    same sequence (accelerate's `BatchSamplerShard` then hands process k of N the batches k, k+N, ...).

    Each `__iter__` runs (the rest of) one epoch, then `epoch` += 1 and `position` = 0. `position` counts the
    indices yielded in the current epoch; `state_dict()` -> {"epoch", "position"}; after `load_state_dict(state)`
    (or `set_position(p)`) the next `__iter__` continues from exactly that index of that epoch's order.

    Checkpointing: DataLoader workers prefetch and accelerate's DataLoaderShard looks one batch ahead, so the
    sampler runs ahead of the training step. Save the loop's own count instead: {"epoch": loop_epoch,
    "position": batches_done_in_epoch * batch_size * num_processes}.

    There is deliberately no `set_epoch`: accelerate calls `set_epoch(its own pass count)` on a sampler that has
    one at every `__iter__`, which would undo a resumed epoch."""

    def __init__(self, num_items: int, seed: int = 0):
        if num_items <= 0:
            raise ValueError(f"num_items={num_items}: must be positive")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def order(self, epoch: int | None = None) -> list[int]:
        """The full permutation of epoch `epoch` (default: the current one)."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_items  # a full epoch, even when resuming part-way through one

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_items:  # the last epoch was drawn to its end but not closed
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order()
        while self.position < self.num_items:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch = int(state["epoch"])
        if epoch < 0:
            raise ValueError(f"state['epoch']={epoch}: must be >= 0")
        self.epoch = epoch
        self.set_position(int(state["position"]))

    def set_position(self, position: int) -> None:
        if not 0 <= position <= self.num_items:
            raise ValueError(f"position={position}: must be in [0, {self.num_items}]")
        self.position = position


# ------------------------------------------------------------------------------------------------------- masking

class MaskedLMCollator:
    """BERT masking of a batch of {"input_ids": ...} items (see `mlm_collator`). A class, not a closure, so that
    DataLoader workers can pickle it."""

    def __init__(self, *, vocab_size: int, mask_token_id: int, special_token_ids: Sequence[int],
                 mlm_probability: float = 0.15, seed: int | None = None, pad_token_id: int | None = None,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1):
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability={mlm_probability}: must be in (0, 1]")
        if not (0.0 <= mask_replace_prob and 0.0 <= random_replace_prob and
                mask_replace_prob + random_replace_prob <= 1.0):
            raise ValueError(f"mask_replace_prob={mask_replace_prob}, random_replace_prob={random_replace_prob}: "
                             f"must be >= 0 and sum to at most 1")
        specials = {int(i) for i in special_token_ids} | {int(mask_token_id)}
        if pad_token_id is not None:
            specials.add(int(pad_token_id))
        bad = sorted(i for i in specials if not 0 <= i < vocab_size)
        if bad:
            raise ValueError(f"special ids {bad} (mask_token_id={mask_token_id}, special_token_ids, pad_token_id) "
                             f"are outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = pad_token_id
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.seed = seed
        self.special_ids = torch.tensor(sorted(specials), dtype=torch.long)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special_ids] = False
        self.random_pool = allowed.nonzero().squeeze(1)  # what a "random token" may be: no special token
        if len(self.random_pool) == 0 and random_replace_prob > 0:
            raise ValueError(f"vocab_size={vocab_size}: every id is special, nothing to draw random tokens from")

    def _generator(self, input_ids: torch.Tensor) -> torch.Generator | None:
        """With a seed, the masks of a batch depend only on (seed, the batch's ids): reproducible whatever the
        number of DataLoader workers or processes, after a resume, and different for different batches. Without a
        seed, torch's global generator (which accelerate may synchronise across processes: pass a seed)."""
        if self.seed is None:
            return None
        digest = hashlib.blake2b(digest_size=8)
        digest.update(int(self.seed).to_bytes(16, "little", signed=True))
        digest.update(input_ids.numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def _stack(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        if len({len(r) for r in rows}) == 1:
            return torch.stack(rows), None
        if self.pad_token_id is None:
            raise ValueError("items of different lengths need a pad_token_id (or a tokenizer with a pad token)")
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            attention_mask[i, :len(r)] = 1
        return input_ids, attention_mask

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        original, attention_mask = self._stack(items)  # (B, T)
        generator = self._generator(original)
        special = torch.isin(original, self.special_ids)
        if attention_mask is not None:
            special |= attention_mask == 0
        chosen = torch.bernoulli(torch.full(original.shape, self.mlm_probability).masked_fill_(special, 0.0),
                                 generator=generator).bool()
        labels = torch.where(chosen, original, torch.full_like(original, -100))
        input_ids = original.clone()
        # Of the chosen: mask_replace_prob -> mask id; random_replace_prob -> a random non-special id; rest kept.
        to_mask = chosen & torch.bernoulli(torch.full(original.shape, self.mask_replace_prob),
                                           generator=generator).bool()
        input_ids[to_mask] = self.mask_token_id
        remaining = 1.0 - self.mask_replace_prob
        if self.random_replace_prob > 0 and remaining > 0:
            share = min(self.random_replace_prob / remaining, 1.0)
            to_random = chosen & ~to_mask & torch.bernoulli(torch.full(original.shape, share),
                                                            generator=generator).bool()
            draws = torch.randint(len(self.random_pool), (int(to_random.sum()),), generator=generator)
            input_ids[to_random] = self.random_pool[draws]
        batch = {"input_ids": input_ids, "labels": labels}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return batch


def mlm_collator(tokenizer_or_none, *, vocab_size: int, mask_token_id: int, special_token_ids: list[int],
                 mlm_probability: float = 0.15, seed: int | None = None, pad_token_id: int | None = None,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1) -> Callable[[list[dict]], dict]:
    """A collate_fn for masked-LM training on `PackedBlocks` items (their "labels" are ignored).

    BERT's rule: each non-special position is chosen with probability `mlm_probability`; of the chosen, 80% become
    `mask_token_id`, 10% a random id from [0, vocab_size) minus the specials, 10% stay; labels are the original ids
    at chosen positions and -100 elsewhere. Specials (`special_token_ids`, the mask and pad ids, and the
    tokenizer's `all_special_ids`) are never chosen. Byte-level MLM: vocab_size=258, mask_token_id=256,
    special_token_ids=[256, 257].

    One implementation serves bytes and tokens: `transformers.DataCollatorForLanguageModeling` draws its random
    replacements from the whole vocabulary, special tokens included, and needs a tokenizer. The tokenizer, if
    given, only supplies extra special ids and the pad id for items of different lengths (which are then padded,
    with an "attention_mask"). `seed`: masks depend only on (seed, batch ids), see `MaskedLMCollator`."""
    specials = list(special_token_ids)
    if tokenizer_or_none is not None:
        specials += [i for i in tokenizer_or_none.all_special_ids if i < vocab_size]
        if pad_token_id is None:
            pad_token_id = tokenizer_or_none.pad_token_id
    return MaskedLMCollator(vocab_size=vocab_size, mask_token_id=mask_token_id, special_token_ids=specials,
                            mlm_probability=mlm_probability, seed=seed, pad_token_id=pad_token_id,
                            mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob)
