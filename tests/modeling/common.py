"""Checks every model of the package must pass; each model's test module calls them with a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
import transformers
from transformers import AutoConfig


def enable_checkpointing(model, use_reentrant: bool | None = None) -> None:
    """Activation checkpointing through `transformers`' public switch: `activation_checkpointing_enable` where the
    installed release has it (5.23 on, where `gradient_checkpointing_enable` is a deprecated alias), else the old
    name."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def eval_outputs(model, inputs: dict) -> torch.Tensor:
    """The main output tensor of a model in eval mode (logits, or the last hidden state)."""
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output tensor in {type(out)}")


def check_save_load_roundtrip(model, inputs: dict, folder) -> None:
    """save_pretrained writes safetensors; from_pretrained (through the class and through AutoModel*) gives
    identical outputs."""
    expected = eval_outputs(model, inputs)
    model.save_pretrained(folder)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    reloaded = type(model).from_pretrained(folder)
    torch.testing.assert_close(eval_outputs(reloaded, inputs), expected, rtol=0, atol=0)


def check_cpu_offload(model, inputs: dict) -> None:
    """Under accelerate's offloading (`cpu_offload`: parameters on the meta device between calls, brought to the
    execution device by hooks around each module's forward, as a `device_map` that offloads does) the outputs equal
    those of the model itself."""
    from accelerate import cpu_offload

    expected = eval_outputs(model, inputs)
    got = eval_outputs(cpu_offload(model, execution_device=torch.device("cpu")), inputs)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    torch.testing.assert_close(got, expected)


def check_auto_classes(config, auto_classes: dict, folder) -> None:
    """Every AutoModel... class resolves the config (in memory and from a saved folder) to the right class."""
    config.save_pretrained(folder)
    loaded = AutoConfig.from_pretrained(folder)
    assert type(loaded) is type(config)
    for auto_name, cls in auto_classes.items():
        auto = getattr(transformers, auto_name)
        assert type(auto.from_config(config)) is cls, auto_name


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["subquadratic"] = None  # the package must not be importable here
    import os
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != {repo!r}]
    import torch, transformers
    folder, auto_name = sys.argv[1], sys.argv[2]
    inputs, expected = torch.load(sys.argv[3])
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        out = model(**inputs)
    got = next(getattr(out, n) for n in ("logits", "start_logits", "last_hidden_state") if getattr(out, n, None) is not None)
    torch.testing.assert_close(got, expected)
    print("REMOTE_OK", type(model).__name__)
""")


def check_remote_code(model, auto_name: str, inputs: dict, tmp_path) -> None:
    """The saved folder loads with `trust_remote_code=True` in a process that cannot import `subquadratic`, and
    gives the same outputs."""
    folder = tmp_path / "remote"
    expected = eval_outputs(model, inputs)
    model.save_pretrained(folder)
    torch.save((inputs, expected), tmp_path / "io.pt")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT.format(repo=repo))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(folder), auto_name, str(tmp_path / "io.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def check_causality(model, input_ids: torch.Tensor, t: int) -> None:
    """Changing tokens after position t leaves the outputs at positions 0..t unchanged."""
    changed = input_ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint_like(changed[:, t + 1:], 50)) % model.config.vocab_size
    a = eval_outputs(model, {"input_ids": input_ids})
    b = eval_outputs(model, {"input_ids": changed})
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:]), "later outputs should depend on the changed tokens"


def check_padding_invariance(model, input_ids: torch.Tensor, pad_lengths=(1, 7), pad_id: int = 0) -> None:
    """One sequence alone and right-padded in a batch with a longer one gives the same outputs for its tokens."""
    alone = eval_outputs(model, {"input_ids": input_ids[:1], "attention_mask": torch.ones_like(input_ids[:1])})
    length = input_ids.shape[1]
    for extra in pad_lengths:
        other = torch.randint(1, model.config.vocab_size, (1, length + extra))
        padded = torch.cat([input_ids[:1], torch.full((1, extra), pad_id)], dim=1)
        batch = torch.cat([padded, other])
        mask = torch.ones_like(batch)
        mask[0, length:] = 0
        out = eval_outputs(model, {"input_ids": batch, "attention_mask": mask})
        torch.testing.assert_close(out[:1, :length], alone, atol=1e-5, rtol=1e-4)


def check_resize_token_embeddings(model, inputs: dict) -> None:
    """resize_token_embeddings grows the input embeddings, the config and (for LM heads) the logits."""
    old = model.config.vocab_size
    model.resize_token_embeddings(old + 8)
    assert model.config.vocab_size == old + 8
    assert model.get_input_embeddings().weight.shape[0] == old + 8
    out = eval_outputs(model, inputs)
    if model.get_output_embeddings() is not None:
        assert out.shape[-1] == old + 8
