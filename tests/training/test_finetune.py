"""Fine-tuning with `transformers.Trainer` end to end on CPU: a tiny fresh model beats the majority class on the
SST-2 slice, the saved folder reloads and predicts the same, its model card parses and carries the measured
numbers; token classification, Reformer's causal pooling and the long-document packing run; bad input fails
with a one-line error before training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    EvalPrediction,
    TrainingArguments,
    pipeline,
)

from subquadratic.training import finetune as ft
from subquadratic.training.finetune_cli import run as finetune_command
from subquadratic.training.tokenizer import byte_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
SST2 = {split: os.path.join(FIXTURES, "sst2", f"{split}.tsv") for split in ("train", "dev", "test")}
NER = {split: os.path.join(FIXTURES, "ner", f"{split}.jsonl") for split in ("train", "validation", "test")}
LINFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64, "projected_length": 16}
LONGFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 400, "attention_window": 16}
REFORMER = {"hidden_size": 32, "num_attention_heads": 2, "attention_head_size": 16, "num_hidden_layers": 2,
            "intermediate_size": 64, "lsh_chunk_length": 16, "local_chunk_length": 16, "num_buckets": 4,
            "num_hashes": 2, "max_position_embeddings": 64, "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [8, 24]}
QUIET = ["--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none", "--logging_strategy", "no"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    """A fresh tiny Linformer with a word-level tokenizer (trained on the fixture's 4,000 training phrases),
    fine-tuned with Trainer for 250 steps: ~10 s on one core."""
    out = tmp_path_factory.mktemp("sst2")
    cfg = ft.FinetuneConfig(train_file=SST2["train"], validation_file=SST2["dev"], test_file=SST2["test"],
                            model_type="linformer_encoder", model_config=json.dumps(LINFORMER), tokenizer="word",
                            max_length=64, label_names="negative,positive", dataset_id="sst2")
    args = TrainingArguments(str(out), num_train_epochs=2, learning_rate=3e-3, per_device_train_batch_size=32,
                             per_device_eval_batch_size=100, warmup_steps=0.1, weight_decay=0.01, seed=0,
                             save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no",
                             dataloader_pin_memory=False)
    results = ft.Finetuning(cfg, args).run()
    return results, results["model_folder"]


# ------------------------------------------------------------------------------------------- sequence classes

def test_sst2_beats_the_majority_class(sst2_run):
    results, _ = sst2_run
    # majority: always "positive", the more frequent training label (55.6% of validation, 49.5% of test rows)
    assert results["eval_accuracy"] > results["eval_majority_accuracy"] + 0.05, results
    assert results["test_accuracy"] > results["test_majority_accuracy"] + 0.08, results
    assert 0.5 < results["test_macro_f1"] <= 1


def test_saved_folder_reloads_and_gives_the_measured_accuracy(sst2_run):
    results, folder = sst2_run
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "all_results.json"} <= set(
        os.listdir(folder))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    test = ft.read_local_file(SST2["test"])
    batch = tokenizer(list(test["sentence"]), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    accuracy = float(np.mean(predictions == np.array([int(v) for v in test["label"]])))
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    classify = pipeline("text-classification", model=folder, tokenizer=folder)
    assert classify("a gorgeous , witty , seductive movie .")[0]["label"] in ("negative", "positive")


def test_model_card_parses_and_holds_the_measured_numbers(sst2_run):
    results, folder = sst2_run
    card = ModelCard.load(os.path.join(folder, "README.md"))
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["sst2"]
    assert {"subquadratic", "linformer_encoder", "fine-tuned"} <= set(data.tags)
    measured = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert measured[("test", "accuracy")] == pytest.approx(results["test_accuracy"])
    assert measured[("test", "macro_f1")] == pytest.approx(results["test_macro_f1"])
    assert measured[("validation", "accuracy")] == pytest.approx(results["eval_accuracy"])
    assert all(r.task_type == "text-classification" for r in data.eval_results)
    text = card.text
    assert f"| test | accuracy | {results['test_accuracy']:.4f} |" in text
    assert f"{results['test_majority_accuracy']:.4f}" in text  # the baseline is stated next to the result
    for needed in ("## Architecture", "`projected_length` | `16`", "## Training", "transformers.Trainer",
                   "`learning_rate` | `0.003`", "0 = `negative`", "AutoModelForSequenceClassification",
                   "trust_remote_code=True", "## Limitations", "## Citation", "wang2020linformer"):
        assert needed in text, needed
    saved = json.loads(open(os.path.join(folder, "all_results.json")).read())
    assert saved["test_accuracy"] == results["test_accuracy"]


def test_the_python_recipe_of_the_module_docstring(tmp_path):
    """The step-by-step recipe of `subquadratic.training.finetune`'s docstring, with plain Trainer calls."""
    from transformers import Trainer

    data = ft.load_task_data("sequence_classification", train_file=SST2["dev"], test_file=SST2["test"])
    tokenizer = ft.load_tokenizer(model=None)
    model = ft.load_model("sequence_classification", data.labels, tokenizer, model_type="linformer_encoder",
                          model_config=LINFORMER, max_length=64)
    splits = ft.tokenize(data, tokenizer, max_length=64)
    assert set(splits["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=3, report_to="none",
                                                          save_strategy="no", disable_tqdm=True,
                                                          dataloader_pin_memory=False),
                      train_dataset=splits["train"], processing_class=tokenizer,
                      data_collator=ft.data_collator(data.task, tokenizer),
                      compute_metrics=ft.metrics_function(data.task, data.labels))
    trainer.train()
    metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
    assert {"test_accuracy", "test_macro_f1"} <= set(metrics)
    folder = ft.save_finetuned(trainer, str(tmp_path / "model"), data=data, metrics=ft.card_metrics(metrics))
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.eval_results[0].metric_value == pytest.approx(metrics["test_accuracy"])


def test_reformer_pools_the_last_real_token_with_right_padding(tmp_path):
    """Reformer-LM (causal) through the command: right padding with a mask, so a sentence alone and padded in a
    batch gets the same logits."""
    results = finetune_command([
        "--train_file", SST2["dev"], "--test_file", SST2["test"], "--model_type", "reformer_lm", "--model_config",
        json.dumps(REFORMER), "--max_length", "64", "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--output_dir", str(tmp_path), *QUIET])
    model = AutoModelForSequenceClassification.from_pretrained(results["model_folder"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(results["model_folder"])
    assert model.config.is_decoder and tokenizer.padding_side == "right"
    texts = ["dull", "an exuberant , funny and moving film"]
    with torch.no_grad():
        batch = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-4)
    assert "test_accuracy" in results


def test_no_header_tsv_with_named_labels(tmp_path):
    """AG News's layout: `text<TAB>label` without a header, labels are class names."""
    rows = [("Stocks fell as oil rose.", "Business"), ("The striker scored twice.", "Sports"),
            ("Rain delayed the final.", "Sports"), ("A new chip doubles speed.", "Sci/Tech")]
    path = tmp_path / "ag.tsv"
    path.write_text("".join(f"{t}\t{label}\n" for t, label in rows))
    data = ft.load_task_data("sequence_classification", train_file=str(path), header=False)
    assert data.labels == ["Business", "Sci/Tech", "Sports"]
    assert list(data.splits["train"]["label"]) == [0, 2, 2, 1]
    with pytest.raises(ValueError, match="no_header"):  # read with a header, the first row names the columns
        ft.load_task_data("sequence_classification", train_file=str(path))


def test_hub_names_go_through_datasets(monkeypatch):
    """`glue/sst2` means nyu-mll/glue (config sst2): its class names are used and GLUE's unlabelled rows
    (label -1) are dropped. `datasets.load_dataset` is replaced: no network here."""
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                         "idx": Value("int32")})
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        rows = {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1], "idx": [0, 1, 2]}
        unlabelled = {"sentence": ["?"], "label": [-1], "idx": [0]}
        return DatasetDict(train=Dataset.from_dict(rows, features=features),
                           validation=Dataset.from_dict(rows, features=features),
                           test=Dataset.from_dict(unlabelled, features=features))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = ft.load_task_data("sequence_classification", dataset_name="glue/sst2")
    assert calls == [("nyu-mll/glue", "sst2")]
    assert data.labels == ["negative", "positive"] and set(data.splits) == {"train", "validation"}
    assert data.name == "nyu-mll/glue"


# ------------------------------------------------------------------------------------------- long documents

def test_pack_documents_builds_long_single_class_documents():
    data = ft.load_task_data("sequence_classification", train_file=SST2["train"], max_train_samples=600)
    train = data.splits["train"]
    tokenizer = byte_tokenizer()
    packed = ft.pack_documents(train, tokenizer, 512, seed=0)
    lengths = [len(ids) for ids in tokenizer(list(packed["text"]))["input_ids"]]
    assert max(lengths) <= 512 and np.mean(lengths) > 400  # long, and full
    assert sum(packed["documents"]) == len(train)  # every text used once
    by_label = {}
    for text, label in zip(train["text"], train["label"]):
        by_label.setdefault(text, set()).add(label)
    for doc, label in zip(packed["text"], packed["label"]):  # each document holds texts of its own class only
        assert all(label in by_label[part] for part in doc.split(ft.PACK_SEPARATOR))
    assert ft.pack_documents(train, tokenizer, 512, seed=0)["text"] == packed["text"]


def test_pack_documents_through_the_command(tmp_path):
    results = finetune_command([
        "--train_file", SST2["dev"], "--test_file", SST2["test"], "--model_type", "longformer_style",
        "--model_config", json.dumps(LONGFORMER), "--pack_documents", "128", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), *QUIET])
    card = ModelCard.load(os.path.join(results["model_folder"], "README.md"))
    assert "--pack_documents 128" in card.text
    assert AutoTokenizer.from_pretrained(results["model_folder"]).model_max_length == 128


# ---------------------------------------------------------------------------------------- token classification

def test_token_classification_end_to_end(tmp_path):
    results = finetune_command([
        "--task", "token_classification", "--train_file", NER["train"], "--validation_file", NER["validation"],
        "--test_file", NER["test"], "--model_type", "longformer_style", "--model_config", json.dumps(LONGFORMER),
        "--max_length", "128", "--num_train_epochs", "4", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "16", "--seed", "0", "--output_dir", str(tmp_path), *QUIET])
    for key in ("test_accuracy", "test_f1", "test_macro_f1", "eval_f1"):
        assert 0 <= results[key] <= 1, key
    assert results["test_f1"] > 0.2  # capitalised names are easy to find even from bytes
    folder = results["model_folder"]
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tags = set(model.config.id2label.values())
    assert tags == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    tagger = pipeline("token-classification", model=folder, tokenizer=folder)
    assert isinstance(tagger("Ada Lovelace lives in Paris ."), list)
    card = ModelCard.load(os.path.join(folder, "README.md"))
    measured = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert measured[("test", "f1")] == pytest.approx(results["test_f1"])
    assert card.data.pipeline_tag == "token-classification"


def test_word_tags_go_to_the_first_token_of_each_word():
    tokenizer = byte_tokenizer()
    words, tags = ["Ada", "met", "Bo"], [1, 0, 2]
    offsets = tokenizer(" ".join(words), return_offsets_mapping=True)["offset_mapping"]
    assert ft.align_word_tags(words, tags, offsets) == [1, -100, -100, -100, 0, -100, -100, -100, 2, -100]


def test_metrics_from_predictions():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    metrics = ft.classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == 0.75
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: p=1, r=2/3; class 1: p=1/2, r=1
    names = ["O", "B-PER", "I-PER"]
    predictions = np.array([[0, 1, 2, 0], [1, 0, 0, 0]])
    gold = np.array([[0, 1, 1, -100], [1, 0, -100, -100]])
    token = ft.token_classification_metrics(names)(EvalPrediction(predictions=predictions, label_ids=gold))
    assert token["accuracy"] == 0.8
    assert token["f1"] == pytest.approx(2 * 2 / (3 + 3))  # 2 right of 3 predicted and 3 gold non-O tokens
    assert ft.majority_accuracy([1, 1, 0], [1, 0, 0, 0]) == 0.25


# ------------------------------------------------------------------------------------------------- bad input

def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        finetune_command(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars of the data preparation
    assert err.startswith("subquadratic-finetune: error: "), err
    return err


def test_bad_input_fails_clearly_before_training(tmp_path, capsys):
    fresh = ["--model_type", "linformer_encoder", "--model_config", json.dumps(LINFORMER), "--max_length", "64",
             "--output_dir", str(tmp_path / "out"), *QUIET]
    err = one_line_error(["--train_file", SST2["dev"], "--label_column", "sentiment", *fresh], capsys)
    assert "'sentiment'" in err and "['sentence', 'label']" in err
    err = one_line_error(["--task", "token_classification", "--train_file", NER["train"], "--model_type",
                          "reformer_lm", "--output_dir", str(tmp_path / "out")], capsys)
    assert "no token-classification head" in err and "linformer_encoder" in err
    err = one_line_error(["--train_file", str(tmp_path / "missing.tsv"), *fresh], capsys)
    assert "missing.tsv" in err and "does not exist" in err
    err = one_line_error(["--train_file", SST2["dev"], "--test_file", str(tmp_path / "nope.jsonl"), *fresh], capsys)
    assert "nope.jsonl" in err
    no_weights = tmp_path / "ckpt"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "linformer_encoder"}))
    err = one_line_error(["--train_file", SST2["dev"], "--model", str(no_weights), "--output_dir",
                          str(tmp_path / "out")], capsys)
    assert "has no weights" in err
    err = one_line_error(["--train_file", SST2["dev"], *fresh[:4], "--max_length", "100", "--output_dir",
                          str(tmp_path / "out")], capsys)
    assert "max_length=100" in err and "64" in err
    err = one_line_error(["--train_file", SST2["dev"], "--model_type", "linformer_encoder", "--model_config", "{bad",
                          "--output_dir", str(tmp_path / "out")], capsys)
    assert "--model_config is not valid JSON" in err
    err = one_line_error(["--train_file", SST2["dev"], "--output_dir", str(tmp_path / "out")], capsys)
    assert "--model" in err and "--model_type" in err
    assert not os.path.exists(tmp_path / "out" / "model")


def test_token_classification_head_is_checked_for_checkpoints(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("reformer_lm", vocab_size=258, **REFORMER)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    byte_tokenizer().save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="reformer_lm.*no token-classification head"):
        ft.load_model("token_classification", ["O", "B"], byte_tokenizer(), model=str(tmp_path / "lm"))
    # the same causal checkpoint does start a sequence classifier (its base weights kept, a new head)
    model = ft.load_model("sequence_classification", ["a", "b"], byte_tokenizer(), model=str(tmp_path / "lm"),
                          max_length=64)
    assert model.config.num_labels == 2 and model.config.vocab_size >= 258


def test_command_errors_have_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "subquadratic.training.finetune_cli", "--train_file", SST2["dev"],
                             "--label_column", "stars", "--model_type", "linformer_encoder", "--output_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "label column 'stars' is not in the train data" in result.stderr.strip().splitlines()[-1]
