"""Tokenizers for the language-modelling corpora, as `transformers.PreTrainedTokenizerFast` objects, so that
`save_pretrained` / `AutoTokenizer.from_pretrained` round-trip and they ship next to a trained model.

    byte_tokenizer()                                   # id == byte value, plus <mask>=256, <pad>=257
    train_tokenizer(lines, kind="word")                # WikiText word-level vocabulary (the paper setup)
    train_tokenizer(lines, kind="bpe", vocab_size=32000)

Trained tokenizers carry the special tokens `<unk>`, `<pad>`, `<mask>`, `<eos>` at ids 0, 1, 2, 3. No
post-processor is set: `encode` adds nothing, the data pipeline appends `<eos>` at line ends itself."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<pad>", "<mask>", "<eos>")
TOKENIZER_KINDS = ("word", "bpe")
DEFAULT_BPE_VOCAB_SIZE = 32000
BYTE_MASK_ID = 256
BYTE_PAD_ID = 257


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable unicode character (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Raw bytes as tokens: `encode(text) == list(text.encode("utf-8"))` and `decode` gives the text back.

    A BPE model without merges over the ByteLevel alphabet, whose vocabulary maps the character of byte b to id b;
    `<mask>` = 256 and `<pad>` = 257 follow (byte-level MLM uses a model vocabulary of 258). The literal strings
    "<mask>" and "<pad>" in a text are read as those special tokens (so fill-mask prompts work); the corpora
    themselves are built from raw bytes, not through this tokenizer."""
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, each byte is its own piece, so no merge or regex can change the ids.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Added in this order so that <mask> gets 256 and <pad> 257.
    tokenizer.add_special_tokens([AddedToken("<mask>", special=True), AddedToken("<pad>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, mask_token="<mask>", pad_token="<pad>")


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    unk, pad, mask, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unk, pad_token=pad, mask_token=mask,
                                   eos_token=eos)


def _word_level(texts: Iterable[str], vocab_size: int | None, min_frequency: int) -> Tokenizer:
    """Whitespace-separated words -> ids; the words of `texts` by decreasing frequency (ties by the trainer's
    deterministic order), truncated to `vocab_size` entries including the specials; other words -> `<unk>`."""
    counter = Tokenizer(models.WordLevel(unk_token="<unk>"))
    counter.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    counter.add_special_tokens(list(SPECIAL_TOKENS))
    trainer = trainers.WordLevelTrainer(vocab_size=2**31 - 1, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    counter.train_from_iterator(texts, trainer)
    # The trainer also counts special strings that occur in the text (WikiText is full of the literal word
    # "<unk>"), which leaves a hole in the ids; renumber: the specials first, then the words in trained order.
    trained = counter.get_vocab()
    words = [w for w in sorted(trained, key=trained.__getitem__) if w not in SPECIAL_TOKENS]
    if vocab_size is not None:
        words = words[:max(vocab_size - len(SPECIAL_TOKENS), 0)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer  # no decoder: decoding joins the words with single spaces


def _bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): no unknown tokens; a space is prefixed to each text so that a line's first
    word is split like the others."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_tokenizer(texts: Iterable[str], kind: str = "word", vocab_size: int | None = None, *,
                    min_frequency: int = 0) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts` (an iterable of lines or documents; the train split only, so that held-out
    words are unknown to it, as in the standard setup).

    kind="word": every distinct whitespace-separated word of `texts` (WikiText-103: ~268k, the paper-style setup),
        or the `vocab_size` most frequent (specials included); unseen words map to `<unk>`.
    kind="bpe": byte-level BPE with `vocab_size` entries (default 32000).
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if kind == "word":
        return _wrap(_word_level(texts, vocab_size, min_frequency))
    bpe_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    if bpe_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={bpe_size}: byte-level BPE needs at least {len(SPECIAL_TOKENS) + 256} "
                         f"entries (the specials and the 256 bytes)")
    return _wrap(_bpe(texts, bpe_size, min_frequency))
