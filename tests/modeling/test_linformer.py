"""Linformer encoder: configuration checks, exactness at k = n, sharing-mode parameter counts, padding
invariance, save/load (class, AutoModel, trust_remote_code) and training."""

from __future__ import annotations

import pytest
import torch

from subquadratic import (
    LinformerConfig,
    LinformerForMaskedLM,
    LinformerForSequenceClassification,
    LinformerForTokenClassification,
    LinformerModel,
)
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.linformer import AUTO_CLASSES
from tests.attention.test_linformer_attention import full_attention, set_identity
from tests.modeling.common import (
    check_auto_classes,
    check_cpu_offload,
    check_padding_invariance,
    check_remote_code,
    check_resize_token_embeddings,
    check_save_load_roundtrip,
    enable_checkpointing,
    eval_outputs,
)

VOCAB, HIDDEN, LAYERS, HEADS, N, K = 64, 16, 2, 2, 32, 8


def tiny_config(**overrides) -> LinformerConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=32, max_position_embeddings=N, projected_length=K)
    return LinformerConfig(**{**settings, **overrides})


def tiny(cls=LinformerModel, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


def ids(batch=2, length=12):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def projection_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "projection" in name)


# --- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(is_decoder=True), "`is_decoder`=True.*bidirectional"),
    (dict(projected_length=64), "`projected_length\\[0\\]`=64.*at most max_position_embeddings=32"),
    (dict(parameter_sharing="shared"), "`parameter_sharing`='shared'.*'headwise'"),
    (dict(projection_kind="fft"), "`projection_kind`='fft'.*'conv'"),
    (dict(projected_length=[8, 4, 2]), "`projected_length`=\\[8, 4, 2\\].*list of 2"),
    (dict(projection_kind="mean", projected_length=5), "must divide max_position_embeddings=32"),
    (dict(parameter_sharing="layerwise", projected_length=[8, 4]), "same k"),
    (dict(hidden_size=15), "`hidden_size`=15.*multiple of num_attention_heads=2"),
    (dict(max_position_embeddings=0), "`max_position_embeddings`=0"),
    (dict(attention_probs_dropout_prob=1.5), "`attention_probs_dropout_prob`=1.5"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trip_and_model_type(tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert LinformerConfig.model_type not in CONFIG_MAPPING_NAMES
    config = tiny_config(projected_length=[8, 4], parameter_sharing="key-value", projection_kind="conv")
    config.save_pretrained(tmp_path)
    loaded = LinformerConfig.from_pretrained(tmp_path)
    assert loaded.projected_lengths == [8, 4] and loaded.parameter_sharing == "key-value"
    assert loaded.projection_kind == "conv" and loaded.is_decoder is False


# --- modeling ----------------------------------------------------------------------------------------------------

def test_too_long_input_names_n():
    with pytest.raises(ValueError, match="max_position_embeddings = 32"):
        tiny()(input_ids=ids(length=N + 1))


def test_causal_model_is_refused():
    config = tiny_config()
    config.is_decoder = True  # set after validation: building the model still refuses it
    with pytest.raises(ValueError, match="bidirectional"):
        LinformerModel(config)
    with pytest.raises(ValueError, match="bidirectional"):
        LinformerForMaskedLM(config)


@pytest.mark.parametrize("sharing, expected", [
    ("none", LAYERS * 2 * HEADS * K * N),  # E_i, F_i per head and layer
    ("headwise", LAYERS * 2 * K * N),  # E, F per layer
    ("key-value", LAYERS * K * N),  # E = F per layer
    ("layerwise", K * N),  # one E for the whole model
])
def test_sharing_mode_parameter_counts(sharing, expected):
    model = tiny(parameter_sharing=sharing)
    assert projection_params(model) == expected
    # everything else is the same encoder whatever the sharing
    rest = sum(p.numel() for p in model.parameters()) - expected
    assert rest == sum(p.numel() for p in tiny(projection_kind="mean").parameters())


def test_layer_wise_decreasing_k():
    model = tiny(projected_length=[16, 4])
    assert projection_params(model) == 2 * HEADS * (16 + 4) * N
    assert model(input_ids=ids()).last_hidden_state.shape == (2, 12, HIDDEN)


@pytest.mark.parametrize("kind", ["linear", "conv", "mean"])
def test_identity_projections_equal_full_attention_encoder(kind):
    """k = n and E = F = I (or windows of one position): the encoder computes ordinary softmax attention."""
    model = tiny(projected_length=N, projection_kind=kind, parameter_sharing="headwise")
    inputs = {"input_ids": ids(length=N)}
    for layer in model.layers:
        set_identity(layer.attention.key_projection)
        set_identity(layer.attention.value_projection)
    linformer = eval_outputs(model, inputs)
    for layer in model.layers:  # same weights, attention over all n keys
        layer.attention.forward = lambda x, attn=layer.attention, **_: full_attention(attn, x)
    torch.testing.assert_close(linformer, eval_outputs(model, inputs))


@pytest.mark.parametrize("kind, sharing", [("linear", "none"), ("linear", "layerwise"), ("mean", "none"),
                                           ("max", "headwise"), ("conv", "key-value")])
def test_padding_invariance(kind, sharing):
    check_padding_invariance(tiny(LinformerForMaskedLM, projection_kind=kind, parameter_sharing=sharing), ids(1))


def test_hidden_states_and_inputs_embeds():
    model = tiny()
    out = model(input_ids=ids(), output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    again = model(inputs_embeds=model.get_input_embeddings()(ids()))
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)


def test_heads_compute_losses():
    labels = ids()
    mlm = tiny(LinformerForMaskedLM)(input_ids=ids(), labels=labels)
    assert mlm.logits.shape == (2, 12, VOCAB) and torch.isfinite(mlm.loss)
    seq = tiny(LinformerForSequenceClassification, num_labels=3)(input_ids=ids(), labels=torch.tensor([0, 2]))
    assert seq.logits.shape == (2, 3) and torch.isfinite(seq.loss)
    tok = tiny(LinformerForTokenClassification, num_labels=5)(input_ids=ids(), labels=labels % 5)
    assert tok.logits.shape == (2, 12, 5) and torch.isfinite(tok.loss)


@pytest.mark.parametrize("sharing, kind", [("none", "linear"), ("layerwise", "conv")])
def test_training_step_reaches_every_parameter(sharing, kind):
    model = tiny(LinformerForMaskedLM, parameter_sharing=sharing, projection_kind=kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, mask = ids(), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(input_ids=inputs, attention_mask=mask, labels=inputs).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool):
        model = tiny(LinformerForMaskedLM, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        if checkpointing:
            enable_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(input_ids=ids(), labels=ids()).loss.backward()
        return [p.grad for p in model.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, checkpointed)


# --- saving and loading ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LinformerForMaskedLM, LinformerForSequenceClassification])
def test_save_load_roundtrip(cls, tmp_path):
    model = tiny(cls, parameter_sharing="layerwise", projected_length=16)
    check_save_load_roundtrip(model, {"input_ids": ids()}, tmp_path)


@pytest.mark.parametrize("sharing", ["layerwise", "headwise"])
@pytest.mark.parametrize("fast", [False, True])
def test_cpu_offload_gives_the_same_outputs(sharing, fast):
    """On the readable path and on the fast one (SDPA, which projects the inputs first where nothing watches the
    maps: offloaded, they are called as written)."""
    with fast_paths(fast):
        check_cpu_offload(tiny(LinformerForMaskedLM, parameter_sharing=sharing), {"input_ids": ids()})


def test_auto_classes(tmp_path):
    check_auto_classes(tiny_config(), AUTO_CLASSES, tmp_path)


def test_resize_token_embeddings():
    check_resize_token_embeddings(tiny(LinformerForMaskedLM), {"input_ids": ids()})


def test_remote_code(tmp_path):
    """The layerwise-shared projection (owned by the model, used by every layer) survives the flattened code."""
    model = tiny(LinformerForMaskedLM, parameter_sharing="layerwise", projection_kind="linear")
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    check_remote_code(model, "AutoModelForMaskedLM", {"input_ids": ids(), "attention_mask": mask}, tmp_path)

