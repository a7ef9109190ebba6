"""Hub-ready folders: what the fine-tuning and training commands save is complete (weights, config with
`auto_map`, code, tokenizer, card), loads in a process that cannot import the package, and pushing fails with a
one-line message when there is no token or no hub to reach. Nothing here touches the network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from subquadratic.training import finetune as ft
from subquadratic.training import hub
from subquadratic.training.finetune_cli import run as finetune_command
from subquadratic.training.hub import HubError, IncompleteFolderError, check_folder_is_complete, push_folder

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
SST2_DEV = os.path.join(FIXTURES, "sst2", "dev.tsv")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128, "projected_length": 16}
QUIET = ["--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none", "--logging_strategy", "no"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A byte-level Linformer fine-tuned for two steps: the folder `subquadratic-finetune` saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hub")
    cfg = ft.FinetuneConfig(train_file=SST2_DEV, test_file=SST2_DEV, model_type="linformer_encoder",
                            model_config=json.dumps(TINY), max_length=128, max_eval_samples=50)
    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                             report_to="none", disable_tqdm=True, logging_strategy="no", dataloader_pin_memory=False)
    results = ft.Finetuning(cfg, args).run()
    torch.set_num_threads(threads)
    return results["model_folder"]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not in a token file."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub.huggingface_hub, "get_token", lambda: None)


def test_saved_folder_is_complete(folder):
    files = check_folder_is_complete(folder)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "subquadratic_modeling_linformer.py", "subquadratic_modeling_heads.py"):
        assert name in files, name
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("subquadratic_modeling_linformer.")


def test_incomplete_folder_names_what_is_missing(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.remove(broken / "model.safetensors")
    os.remove(broken / "subquadratic_modeling_heads.py")  # imported by the model code, not named in auto_map
    os.remove(broken / "tokenizer.json")
    (broken / "README.md").write_text("---\nlibrary_name: [unclosed\n---\n# card\n")
    with pytest.raises(IncompleteFolderError) as info:
        check_folder_is_complete(broken)
    message = str(info.value)
    for needed in ("safetensors weights", "subquadratic_modeling_heads.py", "tokenizer", "model card"):
        assert needed in message, needed
    assert "\n" not in message
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompleteFolderError, match="auto_map"):
        check_folder_is_complete(broken)
    with pytest.raises(IncompleteFolderError, match="safetensors"):
        push_folder(broken, "someone/model", token="hf_x")  # checked before anything else


CLEAN_LOAD = textwrap.dedent("""
    import sys
    sys.modules["subquadratic"] = None  # the package must not be importable here
    import os
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != {repo!r}]
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder, expected_path = sys.argv[1], sys.argv[2]
    texts, expected = torch.load(expected_path)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected)
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.library_name == "transformers" and card.data.eval_results, card.data
    print("CLEAN_LOAD_OK", type(model).__name__, card.data.eval_results[0].metric_value)
""")


def test_folder_loads_without_the_package(folder, tmp_path):
    """What a hub user without `subquadratic` gets: the model through trust_remote_code, the tokenizer and the
    card, with the same outputs as in this process."""
    texts = ["a gorgeous film", "dull and slow , with no point at all"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.save((texts, expected), tmp_path / "expected.pt")
    script = tmp_path / "clean_load.py"
    script.write_text(CLEAN_LOAD.format(repo=REPO_ROOT))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), folder, str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "CLEAN_LOAD_OK LinformerForSequenceClassification" in result.stdout, result.stdout + result.stderr


def test_push_without_a_token_says_how_to_log_in(folder, no_token):
    with pytest.raises(HubError) as info:
        push_folder(folder, "someone/model")
    message = str(info.value)
    assert "no Hugging Face token" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert "\n" not in message


def test_push_in_offline_mode(folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "someone/model", token="hf_x")


def test_push_when_the_hub_cannot_be_reached(folder, monkeypatch):
    """A closed local port stands in for an unreachable hub: the real client, a real connection error."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError) as info:
        push_folder(folder, "someone/model", token="hf_x")
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectError")
    assert "python -m subquadratic.training.hub" in message and "\n" not in message


def test_push_refused_by_the_hub(folder, monkeypatch):
    def refuse(self, repo_id, **kwargs):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("401 Unauthorized", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubError, match=r"refused the token \(HTTP 401\).*hf auth login"):
        push_folder(folder, "someone/model", token="hf_x")


def test_push_uploads_the_folder(folder, monkeypatch):
    """The calls a push makes, recorded instead of sent."""
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    url = push_folder(folder, "someone/model", token="hf_x", private=True)
    assert url == "https://huggingface.co/someone/model"
    assert calls[0] == ("create", "someone/model", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1]["folder_path"] == folder and calls[1][1]["repo_id"] == "someone/model"


def test_bad_repo_id(folder):
    with pytest.raises(HubError, match="not a hub repository id"):
        push_folder(folder, "not a repo id!", token="hf_x")


def test_finetune_push_fails_before_training_without_a_token(tmp_path, no_token, capsys):
    with pytest.raises(SystemExit) as info:
        finetune_command(["--train_file", SST2_DEV, "--model_type", "linformer_encoder", "--model_config",
                       json.dumps(TINY), "--max_length", "128", "--push_to_hub", "someone/model", "--output_dir",
                       str(tmp_path), *QUIET])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("subquadratic-finetune: error: cannot push to someone/model: no Hugging Face token")
    assert not os.path.exists(tmp_path / "model")  # nothing was trained


def test_push_command_without_a_token(folder, tmp_path):
    """`python -m subquadratic.training.hub FOLDER REPO` in a fresh process with no token: one line, no
    traceback."""
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    result = subprocess.run([sys.executable, "-m", "subquadratic.training.hub", folder, "someone/model"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no Hugging Face token; run `hf auth login` or set the HF_TOKEN" in line


def test_training_command_folder_is_complete(tmp_path):
    """The folder `subquadratic-train` saves (output_dir/model) is complete too, so its push_to_hub option can
    upload it as it is."""
    from subquadratic.training.config import load_config
    from subquadratic.training.loop import train

    from .test_train import SMALL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, [*SMALL, "--max_steps", "2", "--output_dir", str(tmp_path), "--eval_tokens", "256"]))
    finally:
        torch.set_num_threads(threads)
    files = check_folder_is_complete(tmp_path / "model")
    assert "model.safetensors" in files and "README.md" in files
    assert ModelCard.load(tmp_path / "model" / "README.md").data.pipeline_tag == "text-generation"
