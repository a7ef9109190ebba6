"""Reformer-LM through the Hugging Face life cycle, on tiny configs."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from subquadratic import (
    ReformerLMConfig,
    ReformerLMForCausalLM,
    ReformerLMForMaskedLM,
    ReformerLMForSequenceClassification,
    ReformerLMModel,
)
from subquadratic.modeling.cache import output_cache
from subquadratic.modeling.reformer import AUTO_CLASSES
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


def tiny_config(**overrides) -> ReformerLMConfig:
    args = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=8,
                attn_layers=["local", "lsh", "local", "lsh"], lsh_chunk_length=4, local_chunk_length=4,
                num_buckets=4, num_hashes=2, intermediate_size=48, axial_pos_shape=[8, 16],
                axial_pos_embds_dim=[8, 24], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ReformerLMConfig(**{**args, **overrides})


def ids(b=2, t=21, vocab=64, seed=0):
    return torch.randint(1, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# --- configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,field", [
    ({"num_buckets": 3}, "num_buckets"),
    ({"num_buckets": [2, 3]}, "num_buckets"),
    ({"attn_layers": ["lsh", "full"]}, "attn_layers[1]"),
    ({"axial_pos_embds_dim": [8, 8]}, "axial_pos_embds_dim"),
    ({"max_position_embeddings": 1000}, "max_position_embeddings"),
    ({"lsh_chunk_length": 0}, "lsh_chunk_length"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        tiny_config(**overrides)


def test_num_buckets_none_follows_the_papers_rule():
    cfg = tiny_config(num_buckets=None, max_position_embeddings=128, lsh_chunk_length=8)
    assert cfg.resolved_num_buckets == 32  # 2 * 128 / 8
    assert cfg.num_hidden_layers == 4
    assert ReformerLMConfig(num_hidden_layers=3).attn_layers == ["local", "lsh", "local"]


def test_model_type_does_not_clash_with_builtin_reformer():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert ReformerLMConfig.model_type not in CONFIG_MAPPING_NAMES


# --- behaviour -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [["lsh", "lsh"], ["local", "local"], ["local", "lsh"]])
def test_causal_model_is_causal(layers):
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config(attn_layers=layers))
    check_causality(model, ids(t=40), t=17)


@pytest.mark.parametrize("length", [1, 5, 13, 37, 128])
def test_any_length_up_to_the_maximum(length):
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config()).eval()
    logits = eval_outputs(model, {"input_ids": ids(t=length)})
    assert logits.shape == (2, length, 64)
    assert torch.isfinite(logits).all()


def test_too_long_is_refused_with_the_lengths_that_work():
    model = ReformerLMModel(tiny_config())
    with pytest.raises(ValueError, match="lengths 1 to max_position_embeddings=128"):
        model(ids(t=129))


@pytest.mark.parametrize("is_decoder", [True, False])
def test_padding_does_not_change_real_tokens(is_decoder):
    torch.manual_seed(0)
    model = ReformerLMModel(tiny_config(is_decoder=is_decoder))
    check_padding_invariance(model, ids(b=1, t=19))


def _clone_pair(**overrides):
    torch.manual_seed(0)
    rev = ReformerLMForCausalLM(tiny_config(reversible=True, **overrides))
    plain = ReformerLMForCausalLM(tiny_config(reversible=False, **overrides))
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def _loss_and_grads(model, x, seed):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_reversible_equals_ordinary_residual_layers_with_dropout():
    """Same outputs and parameter gradients, with dropout and fresh LSH rotations replayed in the backward."""
    rev, plain = _clone_pair(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    x = ids(t=24)
    loss_r, grads_r = _loss_and_grads(rev, x, seed=7)
    loss_p, grads_p = _loss_and_grads(plain, x, seed=7)
    torch.testing.assert_close(loss_r, loss_p)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # and the randomness is real: another seed gives another loss
    assert not torch.allclose(_loss_and_grads(rev, x, seed=8)[0], loss_r)


def test_reversible_recomputation_reuses_the_buckets_of_the_forward_pass(monkeypatch):
    """The backward pass recomputes each block from inputs rebuilt up to rounding; hashing those again could pick
    other buckets near a tie. Here every hash call gives new random buckets: the gradients still equal those of
    ordinary layers (which never recompute) only if the recomputation takes the forward pass's buckets, and the
    hash and the sort of its buckets run once per LSH layer and step."""
    from subquadratic.modeling.attention import lsh as lsh_module

    calls, sorts = [], []
    sort_order = lsh_module.sort_order
    monkeypatch.setattr(lsh_module, "sort_order", lambda *args: sorts.append(1) or sort_order(*args))
    generator = torch.Generator().manual_seed(0)

    def random_buckets(vectors, rotations, num_buckets, padding_mask=None):
        calls.append(1)
        b, h, t, _ = vectors.shape
        return torch.randint(0, num_buckets, (b, h, rotations.shape[0], t), generator=generator)

    monkeypatch.setattr(lsh_module, "hash_vectors", random_buckets)
    rev, plain = _clone_pair()
    x = ids(t=24)
    generator.manual_seed(0)
    _, grads_r = _loss_and_grads(rev, x, seed=7)
    assert len(calls) == len(sorts) == rev.config.attn_layers.count("lsh")
    generator.manual_seed(0)
    _, grads_p = _loss_and_grads(plain, x, seed=7)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reversible_equals_ordinary_layers_with_padded_positions_in_the_loss():
    """Padding (attention_mask 0) inside the sequence's last chunk, and labels at the padded positions too: the
    reversible stack rebuilds the padded positions' activations as well, and its gradients stay those of
    ordinary layers (fp32)."""
    rev, plain = _clone_pair()
    x = ids(t=24)
    mask = torch.ones_like(x)
    mask[0, 17:] = 0
    results = []
    for model in (rev, plain):
        model.train()
        model.zero_grad()
        torch.manual_seed(7)
        out = model(x, attention_mask=mask, labels=x)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_reversible_gradients_through_autograd_grad_and_inputs():
    """Parameters are inputs of the reversible function: torch.autograd.grad sees them, and so do inputs_embeds."""
    rev, plain = _clone_pair()
    x = ids(t=16)
    for model in (rev, plain):
        model.eval()
    emb = rev.get_input_embeddings()(x).detach().requires_grad_()
    params = [p for p in rev.parameters()]
    grads_r = torch.autograd.grad(rev(inputs_embeds=emb, labels=x).loss, [emb, *params], allow_unused=True)
    emb_p = emb.detach().requires_grad_()
    grads_p = torch.autograd.grad(plain(inputs_embeds=emb_p, labels=x).loss, [emb_p, *plain.parameters()],
                                  allow_unused=True)
    for a, b in zip(grads_r, grads_p):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, plain = _clone_pair()
    x = ids(t=16)
    _, expected = _loss_and_grads(plain, x, seed=0)
    enable_checkpointing(plain, use_reentrant=False)
    _, got = _loss_and_grads(plain, x, seed=0)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("head", [ReformerLMForCausalLM, ReformerLMForMaskedLM, ReformerLMForSequenceClassification])
def test_every_parameter_gets_a_gradient(head):
    """No parameter is left unused in a forward pass (DDP without find_unused_parameters)."""
    cfg = tiny_config(is_decoder=head is not ReformerLMForMaskedLM, num_labels=3)
    model = head(cfg).train()
    x = ids(t=12)
    labels = torch.tensor([0, 2]) if head is ReformerLMForSequenceClassification else x
    model(x, labels=labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_autocast_bf16_keeps_softmax_in_fp32_and_trains():
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config()).train()
    x = ids(t=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits.float()
    assert (low - ref).abs().max() < 0.1


def test_hidden_states_and_heads():
    torch.manual_seed(0)
    model = ReformerLMModel(tiny_config())
    out = model(ids(t=10), output_hidden_states=True)
    assert len(out.hidden_states) == 5 and out.hidden_states[-1] is out.last_hidden_state
    assert all(h.shape == (2, 10, 32) for h in out.hidden_states)
    cls = ReformerLMForSequenceClassification(tiny_config(num_labels=3))
    out = cls(ids(t=10), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0


def test_heads_refuse_the_wrong_direction():
    with pytest.raises(ValueError, match="is_decoder=False"):
        ReformerLMForMaskedLM(tiny_config(is_decoder=True))
    with pytest.raises(ValueError, match="is_decoder=True"):
        ReformerLMForCausalLM(tiny_config(is_decoder=False))


def test_generate_with_cache_equals_without():
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config()).eval()
    prompt = ids(t=11)
    with_cache = model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape == (2, 41)
    assert torch.equal(with_cache, without)


def test_cached_logits_equal_full_forward():
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config()).eval()
    x = ids(t=30)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        steps = [out.logits]
        for t in range(9, 30):
            # the cache under its transformers >= 5.24 name on odd steps, the older name on even ones
            name = "cache" if t % 2 else "past_key_values"
            out = model(x[:, t:t + 1], use_cache=True, **{name: output_cache(out)})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_cache_given_under_both_names_is_refused():
    model = ReformerLMForCausalLM(tiny_config()).eval()
    out = model(ids(t=9), use_cache=True)
    with pytest.raises(ValueError, match="`cache`.*`past_key_values`"):
        model(ids(t=1), cache=output_cache(out), past_key_values=output_cache(out))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config()).eval()
    x = ids(t=16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits)


# --- Hugging Face life cycle ---------------------------------------------------------------------------------

def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    check_save_load_roundtrip(ReformerLMForCausalLM(tiny_config()), {"input_ids": ids(t=13)}, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is ReformerLMForCausalLM


def test_auto_classes(tmp_path):
    check_auto_classes(tiny_config(), {k: v for k, v in AUTO_CLASSES.items() if v is not ReformerLMForMaskedLM},
                       tmp_path)
    check_auto_classes(tiny_config(is_decoder=False), {"AutoModelForMaskedLM": ReformerLMForMaskedLM}, tmp_path)


def test_tied_embeddings_share_storage(tmp_path):
    model = ReformerLMForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    check_save_load_roundtrip(model, {"input_ids": ids(t=9)}, tmp_path)


def test_cpu_offload_gives_the_same_outputs():
    """Axial position tables included (read from a `ParameterList`, they stayed on the meta device)."""
    torch.manual_seed(0)
    check_cpu_offload(ReformerLMForCausalLM(tiny_config()), {"input_ids": ids(t=13)})


def test_axial_position_tables_are_initialised_like_the_other_embeddings():
    torch.manual_seed(0)
    model = ReformerLMForCausalLM(tiny_config(initializer_range=0.05))
    tables = model.model.embeddings.position_embeddings.weights()
    assert len(tables) == 2
    for table in tables:
        assert 0.03 < table.std().item() < 0.07


def test_axial_position_tables_under_pruning_and_parametrization():
    """Pruning and parametrizations rename a table's parameter: the tables are still read in order, by name."""
    from torch.nn.utils import parametrize, prune

    from subquadratic.modeling.layers.embeddings import AxialPositionEmbedding

    torch.manual_seed(0)
    positions = torch.arange(16)[None]
    embedding = AxialPositionEmbedding([4, 4], [2, 3])
    with torch.no_grad():
        for table in embedding.weights():
            table.normal_()
    expected = embedding(positions)
    prune.identity(embedding.weights, "0")  # a mask of ones: nothing changes
    torch.testing.assert_close(embedding(positions), expected)

    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    parametrize.register_parametrization(embedding.weights, "1", Double())
    torch.testing.assert_close(embedding(positions), torch.cat([expected[..., :2], 2 * expected[..., 2:]], dim=-1))
    assert len(embedding.weights) == 2 and embedding.weights[0].shape == (4, 2)


def test_resize_token_embeddings():
    torch.manual_seed(0)
    check_resize_token_embeddings(ReformerLMForCausalLM(tiny_config()), {"input_ids": ids(t=9)})


def test_remote_code_loads_without_the_package(tmp_path):
    torch.manual_seed(0)
    check_remote_code(ReformerLMForCausalLM(tiny_config()), "AutoModelForCausalLM", {"input_ids": ids(t=13)},
                      tmp_path)


def test_builds_under_another_default_device():
    """The fixed rotations come from a CPU generator also when the default device is another one (a model built
    under `with torch.device("cuda")` failed before)."""
    with torch.device("meta"):
        model = ReformerLMModel(tiny_config())
    assert model.layers.f_blocks[1].sublayer.fixed_rotations.device.type == "cpu"


def test_attention_mask_of_the_wrong_shape_is_refused():
    model = ReformerLMModel(tiny_config())
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 9\); expected \(2, 10\)"):
        model(ids(t=10), attention_mask=torch.ones(2, 9))
