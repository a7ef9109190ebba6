"""The training command end to end on CPU: loss falls, kill-and-resume continues the same curve, two processes
equal one with the same global batch, and bad input fails before training starts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subquadratic.training.config import load_config, preset_names
from subquadratic.training.loop import Run, train

SMALL = ["--model", "{hidden_size: 32, num_attention_heads: 2, attention_head_size: 16, num_hidden_layers: 2, "
                    "intermediate_size: 64, lsh_chunk_length: 16, local_chunk_length: 16, num_buckets: 4, "
                    "num_hashes: 2, max_position_embeddings: 64, axial_pos_shape: [8, 8], "
                    "axial_pos_embds_dim: [8, 24], hidden_dropout_prob: 0.1}",
         "--seq_len", "64", "--batch_size", "4", "--log_every", "1", "--trackers", "[]", "--eval_tokens", "1024",
         "--warmup_steps", "2", "--learning_rate", "3e-3"]


def losses(output_dir) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs again from its checkpoint on)."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "subquadratic.training.cli", *args], capture_output=True,
                          text=True, timeout=600, **kw)


def cli_two_processes(args):
    """The CLI under `accelerate launch` with two processes. `--cpu` starts a single process in accelerate 1.x; on
    a machine without GPUs the multi-process launcher runs the processes on the CPU with the gloo backend."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "subquadratic.training.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset", [p for p in preset_names() if p.endswith("-tiny") and "wikitext" not in p])
def test_tiny_presets_train_and_loss_falls(preset, tmp_path):
    cfg = load_config(preset, ["--max_steps", "30", "--batch_size", "4", "--output_dir", str(tmp_path), "--trackers", "[]",
                               "--log_every", "5", "--save_every", "0", "--eval_every", "0"])
    metrics = train(cfg)
    curve = losses(tmp_path)
    assert curve[30] < curve[5] - 0.3, curve
    assert metrics["valid/loss"] < 6.0
    assert os.path.exists(tmp_path / "model" / "model.safetensors")


def test_saved_folder_loads_with_auto_classes(tmp_path):
    train(load_config(None, [*SMALL, "--max_steps", "3", "--output_dir", str(tmp_path)]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tokenizer("To be", return_tensors="pt").input_ids
    assert ids.tolist() == [list(b"To be")]
    assert model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (1, 10)
    results = json.loads((tmp_path / "model" / "train_results.json").read_text())
    assert results["step"] == 3 and "test/bpc" in results


def test_kill_and_resume_continues_the_same_loss_curve(tmp_path):
    args = [*SMALL, "--max_steps", "24", "--save_every", "4", "--final_eval", "false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli([*args, "--output_dir", str(straight)]).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "subquadratic.training.cli", *args, "--output_dir", str(resumed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = resumed / "checkpoints" / "step-00000008"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(resumed))
    assert killed_at < 24, "the run finished before it could be killed; make it longer"
    result = cli([*args, "--output_dir", str(resumed)])
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout + result.stderr
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in range(1, 25):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    # without dropout the step is a deterministic function of the batch (LSH rotations are drawn from the same
    # seeded stream in every process), so one process and two must agree to float tolerance
    common = [*SMALL, "--max_steps", "3", "--final_eval", "false", "--model.hidden_dropout_prob", "0.0",
              "--model.attention_probs_dropout_prob", "0.0"]
    one = cli([*common, "--batch_size", "4", "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = cli_two_processes([*common, "--batch_size", "2", "--output_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a, b)
    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4)


def test_two_processes_train_a_longformer_without_global_tokens(tmp_path):
    """Masked-LM batches have no global tokens, so the global projections get no gradient: DDP must be told to
    look for unused parameters (it fails at the second step otherwise)."""
    result = cli_two_processes(["longformer-mlm-tiny", "--max_steps", "3", "--seq_len", "128", "--batch_size", "2",
                                "--log_every", "1", "--trackers", "[]", "--final_eval", "false",
                                "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize("overrides,message", [
    (["--dataset", "text", "--data_path", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--dataset", "wikitext-103", "--data_path", "/nonexistent/wikitext"], "/nonexistent/wikitext"),
    (["--seq_len", "128"], "max_position_embeddings=64"),
    (["--model_type", "transformer_xxl"], "unknown model_type 'transformer_xxl'"),
    (["--task", "masked_lm", "--model.is_decoder", "true"], "contradicts task"),
])
def test_bad_input_fails_before_training(overrides, message, tmp_path):
    cfg = load_config(None, [*SMALL, "--output_dir", str(tmp_path), *overrides])
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        Run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_cuda_graph_needs_one_gpu_and_no_fp16(tmp_path):
    with pytest.raises(ValueError, match="`mixed_precision`='fp16'.*cuda_graph"):
        load_config(None, ["--cuda_graph", "true", "--mixed_precision", "fp16"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`cuda_graph`=True records the step on one GPU"):
            Run(load_config(None, [*SMALL, "--output_dir", str(tmp_path), "--cuda_graph", "true"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cuda_graph_training_follows_the_eager_loss_curve(precision, tmp_path):
    # no dropout and fixed rotations: the recording's warm-up steps draw random numbers the eager run does not
    args = [*SMALL, "--model.hidden_dropout_prob", "0", "--model.attention_probs_dropout_prob", "0",
            "--model.hash_seed", "0", "--max_steps", "6",
            "--mixed_precision", precision, "--gradient_accumulation_steps", "2", "--final_eval", "false",
            "--sample_prompt", "null"]
    for run, extra in (("eager", []), ("graph", ["--cuda_graph", "true"])):  # one process each (accelerate's state)
        result = cli([*args, "--output_dir", str(tmp_path / run), *extra])
        assert result.returncode == 0, result.stderr[-3000:]
    eager, graph = losses(tmp_path / "eager"), losses(tmp_path / "graph")
    assert sorted(graph) == sorted(eager) == list(range(1, 7))
    tolerance = 1e-4 if precision == "no" else 2e-2
    for step in eager:
        assert graph[step] == pytest.approx(eager[step], rel=tolerance), (step, eager, graph)


def test_bad_config_keys_and_values_are_clear():
    with pytest.raises(ValueError, match="unknown training config keys \\['lerning_rate'\\]"):
        load_config(None, ["--lerning_rate", "1e-3"])
    with pytest.raises(ValueError, match="`task`='lm'"):
        load_config(None, ["--task", "lm"])
    assert load_config(None, ["--mixed_precision", "no"]).mixed_precision == "no"  # YAML's bare `no` is false
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset"):
        load_config("no-such-preset")
    result = cli(["--dataset", "text", "--data_path", "/nonexistent/x.txt", "--trackers", "[]"])
    assert result.returncode == 2 and "subquadratic-train: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_without_a_token_fails_before_training(tmp_path, monkeypatch):
    from subquadratic.training.hub import HubError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    cfg = load_config(None, [*SMALL, "--output_dir", str(tmp_path / "run"), "--push_to_hub", "someone/model"])
    with pytest.raises(HubError, match="hf auth login"):
        Run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
