"""Downstream fine-tuning with `transformers.Trainer`: sequence classification (SST-2, AG News, any labelled text)
and token classification (NER-style tagging), from a checkpoint of the package or a fresh config. The training
itself is `Trainer` and `TrainingArguments`, unchanged; this module only prepares what they take (data, model,
tokenizer, collator, metrics) and writes the result as a hub-ready folder with a model card.

The command (`subquadratic-finetune`, see `finetune_cli`):

    subquadratic-finetune --dataset_name glue/sst2 --model runs/reformer/model --output_dir runs/sst2
    subquadratic-finetune --train_file train.tsv --validation_file dev.tsv --test_file test.tsv \\
        --model_type linformer_encoder --model_config '{"hidden_size": 128, "max_position_embeddings": 512}' \\
        --max_length 512 --num_train_epochs 3 --learning_rate 3e-4 --output_dir runs/sst2
    subquadratic-finetune --train_file agnews/dev.tsv --test_file agnews/test.tsv --no_header \\
        --column_names text,label --model_type longformer_style --model_config '{...}' --output_dir runs/ag
    subquadratic-finetune --task token_classification --train_file ner/train.jsonl --model_type linformer_encoder
    subquadratic-finetune ... --push_to_hub user/my-model     # after `hf auth login` (or with HF_TOKEN set)

Every flag of `transformers.TrainingArguments` is accepted as it is (`--learning_rate`, `--num_train_epochs`,
`--per_device_train_batch_size`, `--eval_strategy epoch`, `--bf16`, ...).

The same recipe in Python, step by step:

    from transformers import Trainer, TrainingArguments
    from subquadratic.training import finetune as ft

    data = ft.load_task_data("sequence_classification", train_file="train.tsv", test_file="test.tsv")
    tokenizer = ft.load_tokenizer(model=None)                       # byte-level for a fresh model
    model = ft.load_model("sequence_classification", data.labels, tokenizer, model_type="linformer_encoder",
                          model_config={"hidden_size": 128, "max_position_embeddings": 256}, max_length=256)
    splits = ft.tokenize(data, tokenizer, max_length=256)            # input_ids, attention_mask, labels
    trainer = Trainer(model=model, args=TrainingArguments("runs/sst2", num_train_epochs=3),
                      train_dataset=splits["train"], processing_class=tokenizer,
                      data_collator=ft.data_collator(data.task, tokenizer),
                      compute_metrics=ft.metrics_function(data.task, data.labels))
    trainer.train()
    metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")   # test_accuracy, test_macro_f1
    ft.save_finetuned(trainer, "runs/sst2/model", data=data, metrics=ft.card_metrics(metrics))  # + card

or all of it at once: `Finetuning(FinetuneConfig(...), TrainingArguments(...)).run()`.

Data. A hub name goes through `datasets.load_dataset` (`glue/sst2` and `sst2` mean `nyu-mll/glue`, config `sst2`,
whose labelled splits are train and validation; `ag_news` means `fancyzhx/ag_news`, train and test; any other name
with `--dataset_config`). Local files: `.tsv`, `.csv` (a header line names the columns, or `--no_header` with
`--column_names`), `.json` / `.jsonl` (one object per line, or a list). Sequence classification reads a text column
(`--text_column`; default `text` or `sentence`) and a label column (`--label_column`, default `label`); labels may be
integers or names (AG News's `World`, `Sports`, ...). Token classification reads a list of words
(`--tokens_column`, default `tokens`) and one tag per word (`--tags_column`, default `tags`, or `ner_tags`). Rows
labelled -1 (GLUE's unlabelled test split) are dropped.

Tokenizer and padding. A checkpoint folder brings its own tokenizer (`AutoTokenizer`); a fresh model uses the
byte-level `byte_tokenizer()` (ids 0-255 are the bytes, `<mask>`=256, `<pad>`=257) unless `--tokenizer` names a
folder, or is `word` / `bpe` (a vocabulary trained on the training split: a tiny model learns word-level tasks
like SST-2 from a few thousand examples far faster from words than from bytes). Batches are padded on the right
with an attention mask: bidirectional models pool the first token; causal ones (Reformer-LM with
`is_decoder=True`) pool the last real token, which the mask locates. For token
classification the words are joined with spaces and the tag of a word goes to its first token (the others, and
the spaces, get -100 and are not scored).

Long documents (`--pack_documents N`). SST-2 sentences and AG News articles are short (AG News averages ~240
bytes), far below the lengths the efficient attention is for. `--pack_documents 4096` turns a classification set
into a long-document one: the examples of each class are shuffled and concatenated (separated by a blank line)
into documents of at most 4096 tokens, labelled with that class, and `max_length` becomes 4096. With a byte-level
model each AG News example is then ~16 articles spread over 4K positions, so the classifier has to gather evidence
from the whole sequence, and the model has to take 4K tokens (e.g. Longformer-style with
`max_position_embeddings >= 4096 + pad_token_id + 1`, Linformer with `max_position_embeddings: 4096`, Reformer-LM
with `axial_pos_shape: [64, 64]`). Every split is packed the same way (seeded), so the reported accuracy is per
packed document; there are ~16x fewer examples, so train for more epochs. `--pad_to_max_length` pads every batch
to `max_length` (measures the full-length cost even when some documents are shorter).

Metrics come from the predictions (`classification_metrics`, `token_classification_metrics`): accuracy and
macro F1; for tagging also the token-level F1 of the non-`O` tags (micro-averaged). No download is involved.

Outputs: `output_dir/model` (`save_pretrained`: safetensors, config with `auto_map`, the model code for
`trust_remote_code`, tokenizer, README.md model card with the measured numbers, `all_results.json`), and
Trainer's own checkpoints in `output_dir`."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ..modeling.auto import CONFIG_CLASSES, has_head, known_model_types
from .model_card import build_model_card, write_model_card
from .tokenizer import TOKENIZER_KINDS, byte_tokenizer, train_tokenizer

TASKS = ("sequence_classification", "token_classification")
AUTO_MODELS = {"sequence_classification": AutoModelForSequenceClassification,
               "token_classification": AutoModelForTokenClassification}
SPLITS = ("train", "validation", "test")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TEXT_COLUMNS = ("text", "sentence", "content", "document")
TAGS_COLUMNS = ("tags", "ner_tags", "labels", "label")
OUTSIDE_TAG = "O"
IGNORE_INDEX = -100
PACK_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class HubDataset:
    """Where a known hub data set lives and how it is laid out."""

    path: str
    config: str | None
    splits: dict  # our split name -> the data set's split name
    text_column: str = "text"
    label_column: str = "label"
    card_name: str = ""


_SST2 = HubDataset("nyu-mll/glue", "sst2", {"train": "train", "validation": "validation"}, "sentence", "label",
                   "nyu-mll/glue")
_AG_NEWS = HubDataset("fancyzhx/ag_news", None, {"train": "train", "test": "test"}, "text", "label",
                      "fancyzhx/ag_news")
# Short names accepted for `dataset_name`; any other name goes to `datasets.load_dataset` as it is.
HUB_DATASETS = {"sst2": _SST2, "glue/sst2": _SST2, "ag_news": _AG_NEWS, "fancyzhx/ag_news": _AG_NEWS}


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class FinetuneConfig:
    """What the fine-tuning command reads besides `transformers.TrainingArguments`."""

    task: str = field(default="sequence_classification",
                      metadata={"help": f"one of {', '.join(TASKS)}"})
    model: str | None = field(default=None, metadata={
        "help": "a save_pretrained folder (or hub name) of a subquadratic model to start from"})
    model_type: str | None = field(default=None, metadata={
        "help": "start from fresh weights of this model type (reformer_lm, longformer_style, linformer_encoder)"})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON object of config fields for --model_type (vocab_size, pad_token_id and labels are set "
                "from the tokenizer and the data)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "a tokenizer folder, or `word` / `bpe` to train one on the training split for a fresh model "
                "(default: the checkpoint's own, or byte-level for a fresh model)"})
    tokenizer_vocab_size: int | None = field(default=None, metadata={
        "help": "vocabulary of a trained `word` (default: every training word) or `bpe` (default 32000) tokenizer"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "a hub data set through `datasets` (glue/sst2, ag_news, or any name with --dataset_config)"})
    dataset_config: str | None = field(default=None, metadata={"help": "the hub data set's config name"})
    dataset_id: str | None = field(default=None, metadata={
        "help": "the data set's name for the model card (default: the hub name, or the train file's folder)"})
    train_file: str | None = field(default=None, metadata={"help": "local .tsv, .csv, .json or .jsonl file"})
    validation_file: str | None = field(default=None, metadata={"help": "evaluated during and after training"})
    test_file: str | None = field(default=None, metadata={"help": "evaluated once after training"})
    text_column: str | None = field(default=None, metadata={"help": "default: text or sentence"})
    label_column: str | None = field(default=None, metadata={"help": "default: label"})
    tokens_column: str | None = field(default=None, metadata={"help": "token classification; default: tokens"})
    tags_column: str | None = field(default=None, metadata={"help": "token classification; default: tags"})
    no_header: bool = field(default=False, metadata={
        "help": "the TSV/CSV files have no header line (AG News); name the columns with --column_names"})
    column_names: str | None = field(default=None, metadata={
        "help": "comma-separated column names for files without a header (default: text,label)"})
    label_names: str | None = field(default=None, metadata={
        "help": "comma-separated class names in id order (e.g. negative,positive for SST-2's 0/1); default: the "
                "data set's names, the integer labels, or the sorted label strings"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per example, longer ones are truncated (default: 512, or --pack_documents)"})
    pack_documents: int | None = field(default=None, metadata={
        "help": "long-document recipe: concatenate examples of the same class into documents of this many tokens"})
    pad_to_max_length: bool = field(default=False, metadata={"help": "pad every batch to max_length"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "use only the first N validation and test rows"})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "REPO_ID: upload the saved folder to this hub repository at the end (needs `hf auth login` or "
                "HF_TOKEN)"})
    hub_private: bool = field(default=False, metadata={"help": "create the hub repository as private"})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {', '.join(TASKS)}")
        if (self.model is None) == (self.model_type is None):
            raise ValueError("give exactly one of --model (a checkpoint folder or hub name) and --model_type "
                             f"(fresh weights; one of {', '.join(known_model_types())})")
        if self.model_config is not None and self.model_type is None:
            raise ValueError("--model_config applies to a fresh --model_type; a checkpoint brings its own config")
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("no training data: give --dataset_name (a hub data set) or --train_file")
        for name in ("max_length", "pack_documents", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name}={value!r}: expected an integer > 0")
        if self.pack_documents and self.task != "sequence_classification":
            raise ValueError("--pack_documents is a recipe for sequence classification")
        if self.pack_documents and self.max_length and self.max_length != self.pack_documents:
            raise ValueError(f"--pack_documents={self.pack_documents} sets max_length; drop --max_length="
                             f"{self.max_length} or make them equal")

    def parsed_model_config(self) -> dict:
        if not self.model_config:
            return {}
        if isinstance(self.model_config, dict):  # a mapping given from Python is taken as it is
            return dict(self.model_config)
        try:
            fields = json.loads(self.model_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_config is not valid JSON ({e}): {self.model_config!r}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--model_config must be a JSON object of config fields, got {self.model_config!r}")
        return fields

    def effective_max_length(self) -> int:
        return self.pack_documents or self.max_length or 512



# -------------------------------------------------------------------------------------------------------- data

@dataclass
class TaskData:
    """The splits of a task with normalised columns: `text` and `label` (int) for sequence classification,
    `tokens` and `tags` (list of int) for token classification; `labels` are the class names by id."""

    task: str
    splits: dict  # split name -> datasets.Dataset
    labels: list[str]
    name: str  # for the model card's metadata
    source: str  # where the data came from, in words

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(d):,}" for s, d in self.splits.items())
        return f"{self.name} ({sizes} rows; {len(self.labels)} labels) from {self.source}"


def _split_columns(path: str, line: int, row: list, names: list[str]) -> dict:
    if len(row) != len(names):
        raise ValueError(f"{path}, line {line}: {len(row)} fields, expected {len(names)} ({', '.join(names)}); "
                         "TSV text must not contain tabs")
    return dict(zip(names, row))


def read_local_file(path: str, *, header: bool = True, column_names: list[str] | None = None):
    """A `datasets.Dataset` from a .tsv, .csv, .json or .jsonl file (text fields stay strings, JSON values keep
    their types). TSV is read without quoting (SST-2 and AG News contain bare quotes)."""
    from datasets import Dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist" if not os.path.exists(path)
                                else f"data file {path!r} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.reader(f))
            rows = [row for row in reader if row]
        if not rows:
            raise ValueError(f"data file {path!r} is empty")
        if header:
            names, rows, first = rows[0], rows[1:], 2
            if column_names:
                raise ValueError("--column_names names the columns of files without a header: add --no_header")
        else:
            names = list(column_names) if column_names else (
                ["text", "label"] if len(rows[0]) == 2 else [f"column{i}" for i in range(len(rows[0]))])
            first = 1
        records = [_split_columns(path, first + i, row, names) for i, row in enumerate(rows)]
        return Dataset.from_dict({n: [r[n] for r in records] for n in names})
    if ext in (".json", ".jsonl"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if text.lstrip().startswith("["):
                records = json.loads(text)
            else:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON lines or a JSON list ({e})") from None
        if not records or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: expected one JSON object per row")
        return Dataset.from_list(records)
    raise ValueError(f"data file {path!r}: unknown format {ext or '(no extension)'}; expected .tsv, .csv, .json or "
                     ".jsonl")


def _pick_column(columns: list[str], given: str | None, defaults: tuple, what: str, flag: str, where: str,
                 hint: str = "") -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{what} column {given!r} is not in {where}; its columns are {columns}{hint}")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"no {what} column in {where} (looked for {', '.join(defaults)}); its columns are "
                     f"{columns}: name it with {flag}{hint}")


def _label_names(feature) -> list[str] | None:
    """The class names of a `datasets.ClassLabel` (or a sequence of them), if that is what the column holds."""
    for candidate in (feature, getattr(feature, "feature", None)):
        names = getattr(candidate, "names", None)
        if names:
            return list(names)
    if isinstance(feature, list) and feature:  # datasets 4+: List(ClassLabel) may also be a plain list
        return _label_names(feature[0])
    return None


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _label_vocabulary(values: list, names: list[str] | None, given: list[str] | None = None
                      ) -> tuple[list[str], Callable]:
    """(class names, value -> id). Integer labels keep their numbers (0..max); other labels are sorted names, or
    in the order of ``given`` (the user's class names), which also names integer labels."""
    ints = [_as_int(v) for v in values]
    numeric = bool(values) and all(i is not None for i in ints)
    if numeric and min(ints) < 0:
        raise ValueError(f"negative labels {sorted({i for i in ints if i < 0})} (other than -1 for unlabelled "
                         "rows); labels must be class ids >= 0 or class names")
    if given is not None:
        if numeric:
            if len(given) <= max(ints):
                raise ValueError(f"--label_names gives {len(given)} names but the labels go up to {max(ints)}")
            return list(given), lambda v: _as_int(v)
        unknown = sorted({str(v) for v in values} - set(given))
        if unknown:
            raise ValueError(f"labels {unknown} are not among --label_names {given}")
        index = {n: i for i, n in enumerate(given)}
        return list(given), lambda v: index[str(v)]
    if names is not None:
        return names, lambda v: int(v)
    if numeric:
        return [str(i) for i in range(max(ints) + 1)], lambda v: _as_int(v)
    if any(isinstance(v, float) for v in values):
        raise ValueError("the labels are real numbers: regression is not supported, labels must be class ids or "
                         "class names")
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return names, lambda v: index[str(v)]


def _unlabelled(value) -> bool:
    return value is None or _as_int(value) == -1


def load_task_data(task: str, *, dataset_name: str | None = None, dataset_config: str | None = None,
                   train_file: str | None = None, validation_file: str | None = None, test_file: str | None = None,
                   text_column: str | None = None, label_column: str | None = None,
                   tokens_column: str | None = None, tags_column: str | None = None, header: bool = True,
                   column_names: list[str] | None = None, label_names: list[str] | None = None,
                   dataset_id: str | None = None, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None) -> TaskData:
    """The splits of a classification task, from local files or a hub data set, with normalised columns and
    integer labels (see `TaskData`). Every problem (missing files or columns, no labels) raises here."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    raw, names_from_features, hint = {}, None, ""
    if train_file or validation_file or test_file:
        if dataset_name:
            raise ValueError("give either --dataset_name or local files (--train_file, ...), not both")
        if not train_file:
            raise ValueError("local data needs --train_file (validation and test files are optional)")
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        for split, path in files.items():
            if path:
                raw[split] = (read_local_file(path, header=header, column_names=column_names), path)
        if any(os.path.splitext(p)[1].lower() in (".tsv", ".csv") for p in files.values() if p) and header:
            hint = " (if the file has no header line, pass --no_header and --column_names)"
        source = ", ".join(f"{s}: {p}" for s, p in files.items() if p)
        name = dataset_id or os.path.basename(os.path.dirname(os.path.abspath(train_file))) or "local"
    elif dataset_name:
        raw, names_from_features, source, name, defaults = _load_hub(dataset_name, dataset_config)
        text_column = text_column or defaults.get("text")
        label_column = label_column or defaults.get("label")
        name = dataset_id or name
    else:
        raise ValueError("no training data: give --dataset_name (a hub data set) or --train_file")

    splits, values = {}, {}
    for split, (dataset, where) in raw.items():
        columns = list(dataset.column_names)
        where = f"the {split} data ({where})"
        if task == "sequence_classification":
            text = _pick_column(columns, text_column, TEXT_COLUMNS, "text", "--text_column", where, hint)
            label = _pick_column(columns, label_column, ("label",), "label", "--label_column", where, hint)
            dataset = dataset.select_columns([text, label]).rename_columns({text: "text", label: "label"})
            keep = [i for i, v in enumerate(list(dataset["label"])) if not _unlabelled(v)]
            if len(keep) < len(dataset):
                dataset = dataset.select(keep)
            if len(dataset) and not all(isinstance(t, str) for t in list(dataset["text"])):
                raise ValueError(f"the text column of {where} holds non-text values")
            names_feature = _label_names(dataset.features["label"])
            values[split] = list(dataset["label"])
        else:
            words = _pick_column(columns, tokens_column, ("tokens", "words"), "tokens", "--tokens_column", where,
                                 hint)
            tags = _pick_column(columns, tags_column, TAGS_COLUMNS, "tags", "--tags_column", where, hint)
            dataset = dataset.select_columns([words, tags]).rename_columns({words: "tokens", tags: "tags"})
            for i, row in enumerate(dataset):
                if not isinstance(row["tokens"], list) or not isinstance(row["tags"], list):
                    raise ValueError(f"{where}, row {i}: tokens and tags must be lists")
                if len(row["tokens"]) != len(row["tags"]):
                    raise ValueError(f"{where}, row {i}: {len(row['tokens'])} tokens but {len(row['tags'])} tags")
            names_feature = _label_names(dataset.features["tags"])
            values[split] = [t for row in list(dataset["tags"]) for t in row]
        names_from_features = names_from_features or names_feature
        limit = max_train_samples if split == "train" else max_eval_samples
        if limit is not None and len(dataset) > limit:
            dataset = dataset.select(range(limit))
        if len(dataset) == 0:
            if split == "train":
                raise ValueError(f"{where} has no labelled rows")
            continue
        splits[split] = dataset
    labels, to_id = _label_vocabulary([v for vs in values.values() for v in vs], names_from_features, label_names)
    if len(labels) < 2:
        raise ValueError(f"the data has {len(labels)} class(es) ({labels}); classification needs at least two")
    column = "label" if task == "sequence_classification" else "tags"
    for split, dataset in splits.items():
        ids = ([to_id(v) for v in dataset[column]] if column == "label" else
               [[to_id(v) for v in row] for row in dataset[column]])
        splits[split] = dataset.remove_columns(column).add_column(column, ids)
    return TaskData(task=task, splits=splits, labels=labels, name=name, source=source)


def _load_hub(dataset_name: str, dataset_config: str | None):
    """Splits of a hub data set through `datasets.load_dataset` (raw datasets, class names, source, card name,
    default columns)."""
    from datasets import load_dataset

    known = HUB_DATASETS.get(dataset_name.lower())
    path = known.path if known else dataset_name
    config = dataset_config or (known.config if known else None)
    try:
        loaded = load_dataset(path, config)
    except (ConnectionError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the hub data set {path!r}" + (f" ({config})" if config else "")
                         + f": {first}. Without a network, pass local files with --train_file ...") from None
    mapping = known.splits if known else {s: s for s in SPLITS}
    if not known and "validation" not in loaded and "dev" in loaded:
        mapping["validation"] = "dev"
    raw = {ours: (loaded[theirs], f"{path} [{theirs}]") for ours, theirs in mapping.items() if theirs in loaded}
    if "train" not in raw:
        raise ValueError(f"the hub data set {path!r} has no train split (it has {list(loaded)})")
    defaults = {"text": known.text_column, "label": known.label_column} if known else {}
    source = f"the hub data set `{path}`" + (f" (config `{config}`)" if config else "")
    return raw, None, source, (known.card_name if known else path), defaults


def pack_documents(dataset, tokenizer: PreTrainedTokenizerBase, length: int, *, seed: int = 0,
                   separator: str = PACK_SEPARATOR):
    """Long-document classification from short labelled texts: within each class (in a seeded random order),
    texts are concatenated with ``separator`` into documents of at most ``length`` tokens, labelled with that
    class; a single longer text becomes a document of its own (and is truncated later). Returns a dataset with
    `text`, `label` and `documents` (texts per packed document), in a seeded random order of classes."""
    from datasets import Dataset

    budget = length - tokenizer.num_special_tokens_to_add(pair=False)
    texts, labels = list(dataset["text"]), list(dataset["label"])
    sizes = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    sep = len(tokenizer(separator, add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    packed = {"text": [], "label": [], "documents": []}
    for label in sorted(set(labels)):
        order = [i for i, v in enumerate(labels) if v == label]
        rng.shuffle(order)
        current, used = [], 0
        for i in order:
            extra = sizes[i] + (sep if current else 0)
            if current and used + extra > budget:
                packed["text"].append(separator.join(texts[j] for j in current))
                packed["label"].append(label)
                packed["documents"].append(len(current))
                current, used, extra = [], 0, sizes[i]
            current.append(i)
            used += extra
        if current:
            packed["text"].append(separator.join(texts[j] for j in current))
            packed["label"].append(label)
            packed["documents"].append(len(current))
    order = list(range(len(packed["text"])))
    rng.shuffle(order)
    return Dataset.from_dict({k: [v[i] for i in order] for k, v in packed.items()}, features=None)


# --------------------------------------------------------------------------------------- tokenizer and model

def check_checkpoint(path: str) -> None:
    """A local checkpoint folder must hold a config and weights; says what is missing."""
    if not os.path.exists(path):
        if path.count("/") == 1 and not path.startswith((".", "/", "~")):
            return  # a hub name: from_pretrained fetches it
        raise FileNotFoundError(f"--model {path!r}: no such folder")
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is a file; expected a save_pretrained folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path!r} has no config.json: not a save_pretrained folder")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise ValueError(f"--model {path!r} has no weights (none of {', '.join(WEIGHT_FILES)}); a folder from "
                         "`subquadratic-train` has them in output_dir/model")


def load_tokenizer(model: str | None = None, tokenizer: str | None = None, *, texts: list[str] | None = None,
                   vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """`tokenizer` if given (a folder or hub name; or `word` / `bpe`: trained on ``texts``, the training split,
    for a fresh model), else the checkpoint's own tokenizer, else (fresh model) the byte-level one. Padding goes
    on the right (causal models pool the last real token, found through the attention mask)."""
    if tokenizer in TOKENIZER_KINDS and not os.path.isdir(tokenizer):
        if model is not None:
            raise ValueError(f"--tokenizer {tokenizer} trains a new vocabulary, which only a fresh --model_type can "
                             f"use; the checkpoint {model!r} brings its own tokenizer")
        if not texts:
            raise ValueError(f"--tokenizer {tokenizer} needs the training texts to learn a vocabulary from")
        tok = train_tokenizer(texts, kind=tokenizer, vocab_size=vocab_size)
    elif tokenizer is None and model is None:
        tok = byte_tokenizer()
    else:
        source = tokenizer or model
        if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in
                                             ("tokenizer.json", "tokenizer_config.json")):
            flag = "--tokenizer" if tokenizer else "--model"
            raise ValueError(f"{flag} {source!r} has no tokenizer (tokenizer.json / tokenizer_config.json); pass "
                             "--tokenizer with a tokenizer folder")
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {source!r}: {str(e).strip().splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer from {tokenizer or model!r} has no padding token (nor an "
                             "end-of-sequence token to pad with)")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def training_texts(data: TaskData) -> list[str]:
    """The texts of the training split as the tokenizer sees them (words joined with spaces for tagging)."""
    train = data.splits["train"]
    if data.task == "sequence_classification":
        return list(train["text"])
    return [" ".join(words) for words in train["tokens"]]


def max_input_length(config) -> int | None:
    """The longest input a model of the package takes (Longformer-style positions start after the padding id)."""
    return getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", None)


def _check_head(task: str, config_class: type, what: str) -> None:
    auto_name = AUTO_MODELS[task].__name__
    if not has_head(config_class, auto_name):
        have = sorted(c.model_type for c in CONFIG_CLASSES.values() if has_head(c, auto_name))
        raise ValueError(f"{what} (model_type {config_class.model_type!r}) has no {task.replace('_', '-')} head; "
                         f"model types with one: {', '.join(have)}")


def config_class_of(model_type: str) -> type:
    for config_class in CONFIG_CLASSES.values():
        if config_class.model_type == model_type:
            return config_class
    raise ValueError(f"unknown model_type {model_type!r}; this package has {', '.join(known_model_types())}")


def _check_length(config, max_length: int) -> None:
    limit = max_input_length(config)
    if limit is not None and max_length > limit:
        how = "raise max_position_embeddings"
        if getattr(config, "max_sequence_length", None) is not None:
            how += f" to at least {max_length + config.pad_token_id + 1} (positions start after pad_token_id)"
        raise ValueError(f"max_length={max_length} is longer than the model takes ({limit} tokens); use "
                         f"--max_length <= {limit}, or for a fresh model {how} in --model_config")


def load_model(task: str, labels: list[str], tokenizer: PreTrainedTokenizerBase, *, model: str | None = None,
               model_type: str | None = None, model_config: dict | None = None, max_length: int = 512):
    """The model for the task with a fresh head for ``labels``: from a checkpoint (any head, or a language model;
    the base weights are kept) or from a fresh config of ``model_type``. Every mismatch raises here."""
    auto = AUTO_MODELS[task]
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in enumerate(labels)}
    if model is not None:
        check_checkpoint(model)
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config of --model {model!r}: {str(e).strip().splitlines()[0]}") \
                from None
        if config.model_type not in known_model_types():
            raise ValueError(f"--model {model!r} is a {config.model_type!r} model, not one of this package "
                             f"({', '.join(known_model_types())})")
        _check_head(task, type(config), f"--model {model!r}")
        _check_length(config, max_length)
        net = auto.from_pretrained(model, num_labels=len(labels), id2label=id2label, label2id=label2id,
                                   ignore_mismatched_sizes=True)
        if net.config.vocab_size < len(tokenizer):  # e.g. a byte-level LM (256) and <mask>/<pad> (258)
            net.resize_token_embeddings(len(tokenizer))
        return net
    _check_head(task, config_class_of(model_type), f"model_type {model_type!r}")
    fields = dict(model_config or {})
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"model_config vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                         f"{len(tokenizer)}")
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.update(num_labels=len(labels), id2label=id2label, label2id=label2id)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model_config for {model_type!r}: {e}") from None
    _check_length(config, max_length)
    return auto.from_config(config)


# ----------------------------------------------------------------------------------------------- tokenization

def _tokenize_sequences(dataset, tokenizer, max_length: int):
    def encode(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": batch["label"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=None)


def align_word_tags(words: list[str], tags: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    """Token labels for ``words`` joined with single spaces: the tag of each word on its first token, -100 on its
    other tokens, on spaces and on special tokens (empty offsets)."""
    starts, ends, pos = [], [], 0
    for word in words:
        starts.append(pos)
        ends.append(pos + len(word))
        pos += len(word) + 1
    labels, word, seen = [], 0, set()
    for start, end in offsets:
        if start == end:
            labels.append(IGNORE_INDEX)
            continue
        while word < len(words) and ends[word] <= start:
            word += 1
        if word < len(words) and starts[word] <= start < ends[word] and word not in seen:
            seen.add(word)
            labels.append(tags[word])
        else:
            labels.append(IGNORE_INDEX)
    return labels


def _tokenize_words(dataset, tokenizer, max_length: int):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token classification needs a fast tokenizer (for character offsets)")

    def encode(batch):
        texts = [" ".join(words) for words in batch["tokens"]]
        out = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
        labels = [align_word_tags(w, t, o) for w, t, o in zip(batch["tokens"], batch["tags"], out["offset_mapping"])]
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": labels}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=None)


def tokenize(data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
             pack_documents_to: int | None = None, seed: int = 0) -> dict:
    """Split name -> dataset of `input_ids`, `attention_mask`, `labels` (packed first for the long-document
    recipe)."""
    out = {}
    for split, dataset in data.splits.items():
        if data.task == "sequence_classification":
            if pack_documents_to:
                dataset = pack_documents(dataset, tokenizer, pack_documents_to, seed=seed)
            out[split] = _tokenize_sequences(dataset, tokenizer, max_length)
        else:
            out[split] = _tokenize_words(dataset, tokenizer, max_length)
    return out


def data_collator(task: str, tokenizer: PreTrainedTokenizerBase, pad_to: int | None = None):
    """Right padding with an attention mask (labels of padded positions: -100 for token classification)."""
    padding = "max_length" if pad_to else "longest"
    if task == "token_classification":
        return DataCollatorForTokenClassification(tokenizer, padding=padding, max_length=pad_to)
    return DataCollatorWithPadding(tokenizer, padding=padding, max_length=pad_to)


# ----------------------------------------------------------------------------------------------------- metrics

def _predictions(eval_pred) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    return predictions, labels


def f1_per_class(predictions: np.ndarray, labels: np.ndarray, classes) -> dict[int, float]:
    out = {}
    for c in classes:
        tp = int(np.sum((predictions == c) & (labels == c)))
        fp = int(np.sum((predictions == c) & (labels != c)))
        fn = int(np.sum((predictions != c) & (labels == c)))
        out[int(c)] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in the labels or the predictions."""
    classes = np.union1d(np.unique(labels), np.unique(predictions))
    scores = f1_per_class(predictions, labels, classes)
    return float(np.mean(list(scores.values()))) if scores else 0.0


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro F1 of sequence classification (for `Trainer(compute_metrics=...)`)."""
    predictions, labels = _predictions(eval_pred)
    return {"accuracy": float(np.mean(predictions == labels)) if labels.size else 0.0,
            "macro_f1": macro_f1(predictions, labels)}


def token_classification_metrics(label_names: list[str]) -> Callable:
    """Token-level metrics over the scored tokens (labels != -100): accuracy, macro F1 over the tags, and `f1`,
    the micro-averaged F1 of the tags other than the outside tag `O` (all tags when there is no `O`)."""
    outside = label_names.index(OUTSIDE_TAG) if OUTSIDE_TAG in label_names else None

    def compute(eval_pred) -> dict[str, float]:
        predictions, labels = _predictions(eval_pred)
        scored = labels != IGNORE_INDEX
        predictions, labels = predictions[scored], labels[scored]
        if outside is None:
            entity_f1 = float(np.mean(predictions == labels)) if labels.size else 0.0
        else:
            tp = int(np.sum((predictions == labels) & (labels != outside)))
            predicted = int(np.sum(predictions != outside))
            gold = int(np.sum(labels != outside))
            entity_f1 = 2 * tp / (predicted + gold) if predicted + gold else 0.0
        return {"accuracy": float(np.mean(predictions == labels)) if labels.size else 0.0,
                "f1": entity_f1, "macro_f1": macro_f1(predictions, labels)}

    return compute


def metrics_function(task: str, labels: list[str]) -> Callable:
    return classification_metrics if task == "sequence_classification" else token_classification_metrics(labels)


def majority_accuracy(train_labels, eval_labels) -> float:
    """Accuracy of always predicting the most frequent training label (the baseline to beat)."""
    if not len(eval_labels):
        return 0.0
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(1 for v in eval_labels if v == majority) / len(eval_labels)


CARD_METRICS = ("accuracy", "f1", "macro_f1")


def card_metrics(results: dict) -> dict[str, float]:
    """Trainer's `eval_accuracy` / `test_macro_f1` ... as the card's `validation/accuracy` / `test/macro_f1`."""
    out = {}
    for key, value in results.items():
        prefix, _, metric = key.partition("_")
        if metric in CARD_METRICS and isinstance(value, (int, float)):
            out[f"{'validation' if prefix == 'eval' else prefix}/{metric}"] = float(value)
    return out


# ------------------------------------------------------------------------------------------------------ saving

CARD_SETTINGS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "seed",
                 "bf16", "fp16")


def save_finetuned(trainer: Trainer, folder: str, *, data: TaskData, metrics: dict[str, float],
                   description: str = "", settings: dict | None = None, repo_id: str | None = None,
                   base_model: str | None = None, results: dict | None = None) -> str:
    """`trainer.save_model` (safetensors, config with `auto_map`, the code for `trust_remote_code`, tokenizer),
    then a README.md model card with the measured ``metrics`` ("split/metric", see `card_metrics`) and
    `all_results.json`. Call it on every process: Trainer decides which one writes."""
    trainer.save_model(folder)
    if not trainer.is_world_process_zero():
        return folder
    model = trainer.model
    description = description or (f"Fine-tuned with `transformers.Trainer` for {trainer.state.global_step} "
                                  f"optimizer steps on {data.summary()}.")
    card = build_model_card(model.config, task=data.task, dataset=data.name, metrics=metrics,
                            training_description=description, training_settings=settings, repo_id=repo_id)
    card.data.tags = [*card.data.tags, "fine-tuned", data.task.replace("_", "-")]
    if base_model and not os.path.exists(base_model):  # a hub name; a local path is no hub metadata
        card.data.base_model = base_model
    write_model_card(folder, card)
    with open(os.path.join(folder, "all_results.json"), "w", encoding="utf-8") as f:
        json.dump(results if results is not None else metrics, f, indent=1, default=str)
    return folder


def describe_training(cfg: FinetuneConfig, data: TaskData, steps: int, baseline: dict[str, float],
                      counts: dict[str, int]) -> str:
    start = (f"the checkpoint `{cfg.model}`" if cfg.model else
             f"fresh weights (a new `{cfg.model_type}` config)")
    if cfg.tokenizer in TOKENIZER_KINDS:
        tokenizer = f"a {cfg.tokenizer}-level tokenizer trained on the training split"
    elif cfg.tokenizer:
        tokenizer = f"the tokenizer of `{cfg.tokenizer}`"
    else:
        tokenizer = "the checkpoint's tokenizer" if cfg.model else "the byte-level tokenizer (one id per UTF-8 byte)"
    lines = [f"Fine-tuned from {start} with `transformers.Trainer` (`subquadratic-finetune`) for {steps} optimizer "
             f"steps, on {data.summary()}.",
             "",
             f"- Examples: {', '.join(f'{s} {n:,}' for s, n in counts.items())}; inputs of up to "
             f"{cfg.effective_max_length()} tokens ({tokenizer}), padded on the right with an attention mask."]
    if cfg.pack_documents:
        lines.append(f"- Long-document recipe: the texts of each class were concatenated into documents of at "
                     f"most {cfg.pack_documents} tokens (`--pack_documents {cfg.pack_documents}`); the metrics "
                     f"are per packed document.")
    lines.append("- Labels: " + ", ".join(f"{i} = `{name}`" for i, name in enumerate(data.labels)) + ".")
    for split, value in baseline.items():
        lines.append(f"- Majority-class accuracy on {split} (always the most frequent training label): "
                     f"{value:.4f}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the recipe

class Finetuning:
    """One fine-tuning run: everything is checked and prepared in the constructor (bad input fails before
    training), then `run()` trains with `Trainer`, evaluates, saves `output_dir/model` and pushes if asked."""

    def __init__(self, cfg: FinetuneConfig, args: TrainingArguments):
        self.cfg, self.args = cfg, args
        max_length = cfg.effective_max_length()
        if cfg.push_to_hub:
            from .hub import check_push_ready

            check_push_ready(cfg.push_to_hub)
        fields = cfg.parsed_model_config()
        if cfg.model_type is not None:  # an unknown type or a missing head fails before any data is read
            _check_head(cfg.task, config_class_of(cfg.model_type), f"model_type {cfg.model_type!r}")
        elif cfg.model is not None:
            check_checkpoint(cfg.model)
        columns = [c.strip() for c in cfg.column_names.split(",")] if cfg.column_names else None
        label_names = [c.strip() for c in cfg.label_names.split(",")] if cfg.label_names else None
        self.data = load_task_data(
            cfg.task, dataset_name=cfg.dataset_name, dataset_config=cfg.dataset_config, train_file=cfg.train_file,
            validation_file=cfg.validation_file, test_file=cfg.test_file, text_column=cfg.text_column,
            label_column=cfg.label_column, tokens_column=cfg.tokens_column, tags_column=cfg.tags_column,
            header=not cfg.no_header, column_names=columns, label_names=label_names, dataset_id=cfg.dataset_id,
            max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples)
        texts = training_texts(self.data) if cfg.tokenizer in TOKENIZER_KINDS else None
        self.tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, texts=texts,
                                        vocab_size=cfg.tokenizer_vocab_size)
        self.tokenizer.model_max_length = max_length
        set_seed(args.seed)  # fresh weights and heads from the run's seed (Trainer seeds only after they exist)
        self.model = load_model(cfg.task, self.data.labels, self.tokenizer, model=cfg.model,
                                model_type=cfg.model_type, model_config=fields, max_length=max_length)
        self.splits = tokenize(self.data, self.tokenizer, max_length, cfg.pack_documents, seed=args.seed)
        self.trainer = Trainer(
            model=self.model, args=args, train_dataset=self.splits["train"],
            eval_dataset=self.splits.get("validation"), processing_class=self.tokenizer,
            data_collator=data_collator(cfg.task, self.tokenizer, max_length if cfg.pad_to_max_length else None),
            compute_metrics=metrics_function(cfg.task, self.data.labels))

    def baselines(self) -> dict[str, float]:
        if self.data.task != "sequence_classification":
            return {}
        train = list(self.splits["train"]["labels"])
        return {split: majority_accuracy(train, list(self.splits[split]["labels"]))
                for split in ("validation", "test") if split in self.splits}

    def run(self) -> dict:
        cfg, trainer = self.cfg, self.trainer
        train_output = trainer.train()
        results = {f"train_{k}" if not k.startswith("train_") else k: v for k, v in train_output.metrics.items()}
        for split, prefix in (("validation", "eval"), ("test", "test")):
            if split in self.splits:
                results.update(trainer.evaluate(self.splits[split], metric_key_prefix=prefix))
        baseline = self.baselines()
        results.update({f"{'eval' if s == 'validation' else s}_majority_accuracy": v for s, v in baseline.items()})
        metrics = card_metrics(results)
        settings = {k: getattr(getattr(self.args, k), "value", getattr(self.args, k)) for k in CARD_SETTINGS}
        settings.update(max_length=cfg.effective_max_length(), pack_documents=cfg.pack_documents,
                        optimizer_steps=trainer.state.global_step)
        counts = {s: len(d) for s, d in self.splits.items()}
        description = describe_training(cfg, self.data, trainer.state.global_step, baseline, counts)
        folder = os.path.join(self.args.output_dir, "model")
        save_finetuned(trainer, folder, data=self.data, metrics=metrics, description=description,
                       settings=settings, repo_id=cfg.push_to_hub, base_model=cfg.model, results=_json_safe(results))
        if cfg.push_to_hub and trainer.is_world_process_zero():
            from .hub import push_folder

            results["hub_url"] = push_folder(folder, cfg.push_to_hub, private=cfg.hub_private)
        results["model_folder"] = folder
        return results


def _json_safe(results: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}


def finetune(cfg: FinetuneConfig, args: TrainingArguments) -> dict:
    """Prepare, train, evaluate, save (and push): the whole recipe; returns the metrics."""
    return Finetuning(cfg, args).run()
