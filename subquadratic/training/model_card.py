"""Model cards for the folders the training and fine-tuning commands write, built with `huggingface_hub`'s
card classes from the template in `model_cards/` (installed as `subquadratic.model_cards`)."""

from __future__ import annotations

import os
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# What the card says of each model type: the mechanism, the paper and its citation.
MODELS = {
    "reformer_lm": dict(
        name="Reformer-LM",
        mechanism="LSH attention (shared query/key, multi-round hashing) alternating with local attention, in "
                  "reversible residual layers with chunked feed-forward and axial position embeddings",
        paper="Kitaev, Kaiser and Levskaya, *Reformer: The Efficient Transformer*, ICLR 2020.",
        citation="@inproceedings{kitaev2020reformer,\n  title={Reformer: The Efficient Transformer},\n"
                 "  author={Kitaev, Nikita and Kaiser, {\\L}ukasz and Levskaya, Anselm},\n"
                 "  booktitle={International Conference on Learning Representations},\n  year={2020}\n}",
        limitations="LSH attention is approximate: a token attends only to earlier tokens that hash to its bucket "
                    "(at most one chunk of them per round), so quality depends on the number of hash rounds. "
                    "Training uses fresh random rotations each step; evaluation uses fixed ones.",
    ),
    "longformer_style": dict(
        name="Longformer-style encoder",
        mechanism="sliding-window attention with optional dilation and symmetric global attention",
        paper="Beltagy, Peters and Cohan, *Longformer: The Long-Document Transformer*, 2020.",
        citation="@article{beltagy2020longformer,\n  title={Longformer: The Long-Document Transformer},\n"
                 "  author={Beltagy, Iz and Peters, Matthew E. and Cohan, Arman},\n"
                 "  journal={arXiv:2004.05150},\n  year={2020}\n}",
        limitations="Tokens outside a window interact only through the global tokens and through depth; choose "
                    "global tokens (e.g. the classification token or question) for the task.",
    ),
    "linformer_encoder": dict(
        name="Linformer encoder",
        mechanism="self-attention whose keys and values are projected along the sequence axis to a fixed length k",
        paper="Wang, Li, Khabsa, Fang and Ma, *Linformer: Self-Attention with Linear Complexity*, 2020.",
        citation="@article{wang2020linformer,\n  title={Linformer: Self-Attention with Linear Complexity},\n"
                 "  author={Wang, Sinong and Li, Belinda Z. and Khabsa, Madian and Fang, Han and Ma, Hao},\n"
                 "  journal={arXiv:2006.04768},\n  year={2020}\n}",
        limitations="The projections are tied to the maximum sequence length n: longer inputs are refused. "
                    "The model is bidirectional only (no causal language modelling).",
    ),
}

TASK_TYPES = {"causal_lm": "text-generation", "masked_lm": "fill-mask",
              "sequence_classification": "text-classification", "token_classification": "token-classification"}
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
                "sequence_classification": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification"}
ARCHITECTURE_SKIP = {"architectures", "auto_map", "id2label", "label2id", "transformers_version", "dtype",
                     "torch_dtype", "model_type", "output_hidden_states", "return_dict"}


def card_template(name: str) -> str:
    """A template from `model_cards/`: installed as `subquadratic.model_cards`, or read from the repository root
    when the package runs from a source checkout that was not installed."""
    try:
        return resources.files("subquadratic.model_cards").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "model_cards", name), encoding="utf-8") as f:
            return f.read()


def build_model_card(config, *, task: str, dataset: str, metrics: dict[str, float],
                     training_description: str, training_settings: dict | None = None,
                     repo_id: str | None = None) -> ModelCard:
    """A card for a model of the package. ``metrics`` maps "split/metric" (e.g. "test/bpc") to measured values;
    they go into the `model-index` metadata and the results table."""
    info = MODELS.get(config.model_type, dict(  # a transformers model trained as a baseline
        name=config.model_type, mechanism="full softmax attention", paper="see the `transformers` documentation.",
        citation="", limitations="Full attention: time and memory grow quadratically with the sequence length."))
    results, eval_results = [], []
    for key, value in sorted(metrics.items()):
        split, _, metric = key.partition("/")
        if not metric or not isinstance(value, (int, float)):
            continue
        results.append({"split": split, "metric": metric, "value": f"{value:.4f}"})
        eval_results.append(EvalResult(task_type=TASK_TYPES[task], dataset_type=dataset, dataset_name=dataset,
                                       dataset_split=split, metric_type=metric, metric_value=float(value)))
    card_data = ModelCardData(library_name="transformers", tags=["subquadratic", config.model_type, "long-context"],
                              datasets=[dataset], metrics=sorted({r["metric"] for r in results}) or None,
                              pipeline_tag=TASK_TYPES[task], eval_results=eval_results or None,
                              model_name=repo_id or info["name"])
    architecture = {k: v for k, v in config.to_diff_dict().items() if k not in ARCHITECTURE_SKIP}
    template = card_template("default.md")
    return ModelCard.from_template(
        card_data, template_str=template, model_name=repo_id or info["name"],
        summary=f"A {info['name']} trained for {task.replace('_', ' ')} on {dataset}.",
        mechanism=info["mechanism"], paper_note=f"Paper: {info['paper']}", architecture=architecture,
        training_description=training_description, training_settings=training_settings or {}, results=results,
        auto_class=AUTO_CLASSES[task], repo_id=repo_id or "path/to/this/folder", limitations=info["limitations"],
        citation=info["citation"])


def write_model_card(folder: str, card: ModelCard) -> str:
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path
