"""Longformer-style model: configuration checks, equality with transformers' LongformerModel after conversion and
with RoBERTa after extension, padding invariance, causality and cached generation, task heads, save/load (class,
AutoModel, trust_remote_code)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from subquadratic import (
    LongformerStyleConfig,
    LongformerStyleForCausalLM,
    LongformerStyleForMaskedLM,
    LongformerStyleForQuestionAnswering,
    LongformerStyleForSequenceClassification,
    LongformerStyleForTokenClassification,
    LongformerStyleModel,
)
from subquadratic.convert.longformer import convert_longformer, longformer_from_roberta, main
from subquadratic.modeling.cache import output_cache
from subquadratic.modeling.longformer import AUTO_CLASSES, question_global_mask
from tests.modeling.common import (
    check_auto_classes,
    check_causality,
    check_cpu_offload,
    check_padding_invariance,
    check_remote_code,
    check_resize_token_embeddings,
    check_save_load_roundtrip,
    enable_checkpointing,
    eval_outputs,
)

VOCAB, HIDDEN, LAYERS, HEADS, PAD, SEP = 64, 16, 2, 4, 1, 2
MAX_POSITIONS = 66  # 64 tokens: positions start at PAD + 1


def tiny_config(**overrides) -> LongformerStyleConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=32, attention_window=[4, 6], attention_dilation=[1, [1, 2, 1, 3]],
                    max_position_embeddings=MAX_POSITIONS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LongformerStyleConfig(**{**settings, **overrides})


def tiny(cls=LongformerStyleModel, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


def ids(batch=2, length=23, seed=1):
    """Token ids with no padding or separator tokens (3 and up)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(attention_window=5), "`attention_window\\[0\\]`=5.*even integer"),
    (dict(attention_window=[4, 4, 4]), "`attention_window`=\\[4, 4, 4\\].*list of 2"),
    (dict(attention_dilation=[1, 2, 3]), "`attention_dilation`=\\[1, 2, 3\\].*list of 2 \\(one per layer\\)"),
    (dict(attention_dilation=[1, [1, 2]]), "`attention_dilation\\[1\\]`=\\[1, 2\\].*list of 4 \\(one per "
                                           "attention head\\)"),
    (dict(attention_dilation=0), "`attention_dilation\\[0\\]\\[0\\]`=0.*integer > 0"),
    (dict(default_global_attention="cls"), "`default_global_attention`='cls'.*'first_token'"),
    (dict(hidden_size=18), "`hidden_size`=18.*multiple of num_attention_heads=4"),
    (dict(max_position_embeddings=2), "`max_position_embeddings`=2.*pad_token_id \\+ 1 = 2"),
    (dict(hidden_dropout_prob=1.0), "`hidden_dropout_prob`=1.0"),
    (dict(max_global_tokens=0), "`max_global_tokens`=0.*integer > 0"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trip_and_model_type(tmp_path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert LongformerStyleConfig.model_type not in CONFIG_MAPPING_NAMES
    tiny_config(attention_window=8, default_global_attention="first_token").save_pretrained(tmp_path)
    loaded = LongformerStyleConfig.from_pretrained(tmp_path)
    assert loaded.attention_window == [8, 8] and loaded.attention_dilation == [[1] * 4, [1, 2, 1, 3]]
    assert loaded.default_global_attention == "first_token" and loaded.max_sequence_length == 64


# --- equality with transformers' Longformer and RoBERTa ------------------------------------------------------------

def hf_longformer(cls=LongformerModel, type_vocab_size=1):
    torch.manual_seed(0)
    config = LongformerConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=32, attention_window=[4, 8],
                              max_position_embeddings=MAX_POSITIONS, type_vocab_size=type_vocab_size,
                              pad_token_id=PAD, layer_norm_eps=1e-5)
    return cls(config).eval()


def padded_batch(length=23):
    """Two rows, the second right-padded (a third), and a global mask with 1 and 2 or 3 global tokens."""
    input_ids, mask = ids(length=length), torch.ones(2, length, dtype=torch.long)
    input_ids[1, 2 * length // 3:], mask[1, 2 * length // 3:] = PAD, 0
    glob = torch.zeros(2, length, dtype=torch.long)
    glob[0, 0] = 1
    glob[1, [1, length // 3, length // 2]] = 1
    return input_ids, mask, glob


@pytest.mark.parametrize("global_attention", [False, True])
@pytest.mark.parametrize("length", [5, 23])
def test_converted_longformer_matches_transformers(global_attention, length):
    hf = hf_longformer(type_vocab_size=2)
    ours = convert_longformer(hf)
    input_ids, mask, glob = padded_batch(length)
    inputs = dict(input_ids=input_ids, attention_mask=mask, token_type_ids=(input_ids % 2),
                  global_attention_mask=glob if global_attention else None)
    with torch.no_grad():
        expected, got = hf(**inputs).last_hidden_state, ours(**inputs).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_converted_masked_lm_matches_transformers():
    hf = hf_longformer(LongformerForMaskedLM)
    ours = convert_longformer(hf)
    assert type(ours) is LongformerStyleForMaskedLM
    input_ids, mask, glob = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=mask, global_attention_mask=glob).logits
        got = ours(input_ids, attention_mask=mask, global_attention_mask=glob).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)
    assert ours.lm_head.decoder.weight is ours.model.embeddings.word_embeddings.weight  # tied, as in RoBERTa


def test_convert_command_line_from_folder(tmp_path):
    hf = hf_longformer()
    hf.save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "converted")])
    ours = AutoModel.from_pretrained(tmp_path / "converted")
    assert type(ours) is LongformerStyleModel
    input_ids, mask, glob = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    got = eval_outputs(ours, dict(input_ids=input_ids, attention_mask=mask, global_attention_mask=glob))
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)


def test_roberta_extension_copies_positions_and_keeps_outputs():
    torch.manual_seed(0)
    roberta = RobertaForMaskedLM(RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=32, max_position_embeddings=18, pad_token_id=PAD, type_vocab_size=1)).eval()
    long = longformer_from_roberta(roberta, max_length=50, attention_window=32)
    assert long.config.max_sequence_length == 50
    old = roberta.roberta.embeddings.position_embeddings.weight  # 16 learned positions after the offset 2
    new = long.model.embeddings.position_embeddings.weight
    torch.testing.assert_close(new[2 + 35], old[2 + 35 % 16])
    # a window covering the whole input is full attention, so RoBERTa's outputs come back
    input_ids, mask, _ = padded_batch(length=16)
    with torch.no_grad():
        expected = roberta(input_ids, attention_mask=mask).logits
        got = long(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)
    assert long(ids(1, 50)).logits.shape == (1, 50, VOCAB)


# --- modeling ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("no_global_tokens", [False, True])
def test_max_global_tokens_pads_the_global_tokens_to_a_fixed_count(no_global_tokens):
    input_ids, mask, glob = padded_batch()  # rows with 1 and 3 global tokens
    if no_global_tokens:
        glob = torch.zeros_like(glob)
    real = mask.bool()
    labels = input_ids.masked_fill(~real, -100)  # outputs at padding positions may differ; they carry no loss
    outputs = {}
    for size in (None, 3, 5, 40):  # 40: more than the 23 tokens
        model = tiny(LongformerStyleForMaskedLM, max_global_tokens=size).train()
        out = model(input_ids, attention_mask=mask, global_attention_mask=glob, labels=labels)
        out.loss.backward()
        outputs[size] = (out.logits[real], [p.grad for p in model.parameters() if p.grad is not None])
    for size in (3, 5, 40):
        torch.testing.assert_close(outputs[size][0], outputs[None][0])
        for got, want in zip(outputs[size][1], outputs[None][1], strict=True):
            torch.testing.assert_close(got, want)
    if not no_global_tokens:
        with pytest.raises(ValueError, match="more global tokens than max_global_tokens=2 \\(3\\)"):
            tiny(max_global_tokens=2)(input_ids, attention_mask=mask, global_attention_mask=glob)


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="Sequence length 65 is longer.*lengths 1 to 64"):
        model(ids(1, 65))
    with pytest.raises(ValueError, match="`global_attention_mask` has shape \\(2, 5\\); expected \\(2, 23\\)"):
        model(ids(), global_attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        model(ids(), attention_mask=torch.ones(2, 22))
    with pytest.raises(ValueError, match="exactly one of"):
        model()


@pytest.mark.parametrize("default_global", ["none", "first_token"])
def test_padding_invariance(default_global):
    model = tiny(LongformerStyleForMaskedLM, default_global_attention=default_global)
    check_padding_invariance(model, ids(1), pad_lengths=(1, 9), pad_id=PAD)


def test_all_ones_attention_mask_reaches_the_attention_as_no_mask(monkeypatch):
    """An all-ones mask (what a collator gives an unpadded batch) is dropped before the layers, so the attention
    takes its unpadded kernels; a mask with padding is passed on. Either way the logits are those without one."""
    model = tiny(LongformerStyleForMaskedLM).eval()
    seen = []
    attention = type(model.model.layers[0].attention)
    forward = attention.forward
    monkeypatch.setattr(attention, "forward", lambda self, h, padding_mask=None, **kw: (
        seen.append(padding_mask), forward(self, h, padding_mask=padding_mask, **kw))[1])
    input_ids = ids(2, 23)
    with torch.no_grad():
        plain = model(input_ids).logits
        ones = model(input_ids, attention_mask=torch.ones(2, 23, dtype=torch.long)).logits
        assert all(mask is None for mask in seen)
        mask = torch.ones(2, 23, dtype=torch.long)
        mask[1, 20:] = 0
        model(input_ids, attention_mask=mask)
    torch.testing.assert_close(ones, plain)
    assert torch.equal(seen[-1], mask.bool())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")  # still what legacy ONNX uses
def test_traced_with_an_all_ones_mask_still_reads_the_mask():
    """`torch.jit.trace` records one path: with an all-ones example mask it must not record "no padding"."""
    model = tiny(LongformerStyleForMaskedLM).eval().requires_grad_(False)
    input_ids = ids(2, 23)
    traced = torch.jit.trace(lambda i, m: model(i, attention_mask=m).logits,
                             (input_ids, torch.ones(2, 23, dtype=torch.long)), check_trace=False)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(traced(input_ids, mask)[mask.bool()], expected[mask.bool()])


def test_causality_with_dilation_and_global_first_token():
    model = tiny(LongformerStyleForCausalLM, is_decoder=True, default_global_attention="first_token")
    check_causality(model, ids(2, 30), t=17)


@pytest.mark.parametrize("with_global_mask", [False, True])
def test_generate_with_cache_equals_without(with_global_mask):
    model = tiny(LongformerStyleForCausalLM, is_decoder=True, default_global_attention="first_token")
    prompt, mask = ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    prompt[1, :3], mask[1, :3] = PAD, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    if with_global_mask:
        glob = torch.zeros(2, 9, dtype=torch.long)
        glob[:, [4, 6]] = 1
        kwargs["global_attention_mask"] = glob
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 21)
    torch.testing.assert_close(cached, uncached)
    # and the logits of one cached step equal the full pass
    out = model(prompt, attention_mask=mask, use_cache=True)
    step = model(cached[:, 9:10], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=output_cache(out))
    full = model(cached[:, :10], attention_mask=torch.cat([mask, mask[:, :1]], 1), use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-4)


def test_default_global_attention_of_the_heads():
    """Classification: the first token; QA: the question (before the first separator)."""
    long_input = ids(2, 40)  # longer than the windows, so global attention changes the outputs
    seq = tiny(LongformerStyleForSequenceClassification, num_labels=3)
    first = torch.zeros(2, 40, dtype=torch.long)
    first[:, 0] = 1
    default = eval_outputs(seq, {"input_ids": long_input})
    torch.testing.assert_close(default, eval_outputs(seq, {"input_ids": long_input, "global_attention_mask": first}))
    assert not torch.allclose(default, eval_outputs(seq, {"input_ids": long_input,
                                                          "global_attention_mask": torch.zeros_like(first)}))

    qa_input = long_input.clone()
    qa_input[0, [5, 6, 39]] = SEP
    qa_input[1, [9, 10, 39]] = SEP
    question = question_global_mask(qa_input, SEP)
    assert question.sum(1).tolist() == [5, 9] and question[1, :9].all()
    qa = tiny(LongformerStyleForQuestionAnswering)
    torch.testing.assert_close(eval_outputs(qa, {"input_ids": qa_input}),
                               eval_outputs(qa, {"input_ids": qa_input, "global_attention_mask": question}))


def test_heads_compute_losses():
    labels = ids()
    mlm = tiny(LongformerStyleForMaskedLM)(input_ids=ids(), labels=labels)
    assert mlm.logits.shape == (2, 23, VOCAB) and torch.isfinite(mlm.loss)
    clm = tiny(LongformerStyleForCausalLM, is_decoder=True)(input_ids=ids(), labels=labels)
    assert clm.logits.shape == (2, 23, VOCAB) and torch.isfinite(clm.loss)
    seq = tiny(LongformerStyleForSequenceClassification, num_labels=3)(input_ids=ids(), labels=torch.tensor([0, 2]))
    assert seq.logits.shape == (2, 3) and torch.isfinite(seq.loss)
    tok = tiny(LongformerStyleForTokenClassification, num_labels=5)(input_ids=ids(), labels=labels % 5)
    assert tok.logits.shape == (2, 23, 5) and torch.isfinite(tok.loss)
    qa = tiny(LongformerStyleForQuestionAnswering)(input_ids=ids(), start_positions=torch.tensor([1, 2]),
                                                   end_positions=torch.tensor([3, 4]))
    assert qa.start_logits.shape == (2, 23) and torch.isfinite(qa.loss)
    with pytest.raises(ValueError, match="bidirectional"):
        tiny(LongformerStyleForMaskedLM, is_decoder=True)
    with pytest.raises(ValueError, match="causal"):
        tiny(LongformerStyleForCausalLM)


def test_hidden_states_and_inputs_embeds():
    model = tiny()
    out = model(input_ids=ids(), output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    again = model(inputs_embeds=model.get_input_embeddings()(ids()))
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)


def test_training_step_and_gradient_checkpointing():
    def grads(checkpointing: bool):
        model = tiny(LongformerStyleForMaskedLM).train()
        if checkpointing:
            enable_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        glob = torch.zeros(2, 23, dtype=torch.long)
        glob[:, 0] = 1
        model(input_ids=ids(), global_attention_mask=glob, labels=ids()).loss.backward()
        return dict(model.named_parameters())

    plain, checkpointed = grads(False), grads(True)
    for name, p in plain.items():
        if name.endswith("key_global.bias"):  # an exact zero: it adds the same score to every key of a query
            assert p.grad is not None and not p.grad.any() and not checkpointed[name].grad.any(), name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # global projections included
        torch.testing.assert_close(p.grad, checkpointed[name].grad)


# --- saving and loading ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, overrides", [
    (LongformerStyleForMaskedLM, {}),
    (LongformerStyleForCausalLM, dict(is_decoder=True)),
    (LongformerStyleForQuestionAnswering, {}),
])
def test_save_load_roundtrip(cls, overrides, tmp_path):
    check_save_load_roundtrip(tiny(cls, **overrides), {"input_ids": ids()}, tmp_path)


def test_cpu_offload_gives_the_same_outputs():
    """With global tokens too (their maps are called as modules when watched, see `anything_watching`)."""
    global_mask = torch.zeros(2, 23, dtype=torch.long)
    global_mask[:, 0] = 1
    check_cpu_offload(tiny(LongformerStyleForMaskedLM), {"input_ids": ids(), "global_attention_mask": global_mask})


def test_auto_classes(tmp_path):
    check_auto_classes(tiny_config(), {k: v for k, v in AUTO_CLASSES.items() if k != "AutoModelForCausalLM"},
                       tmp_path / "bidirectional")
    check_auto_classes(tiny_config(is_decoder=True), {"AutoModelForCausalLM": LongformerStyleForCausalLM},
                       tmp_path / "causal")


def test_resize_token_embeddings():
    check_resize_token_embeddings(tiny(LongformerStyleForMaskedLM), {"input_ids": ids()})


def test_remote_code(tmp_path):
    model = tiny(LongformerStyleForSequenceClassification, num_labels=3)
    check_remote_code(model, "AutoModelForSequenceClassification", {"input_ids": ids(2, 30)}, tmp_path)
