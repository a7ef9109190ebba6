"""Publishing a saved model folder on the Hugging Face Hub, with `huggingface_hub.HfApi` (`create_repo`,
`upload_folder`), after checking that the folder is complete:

    check_folder_is_complete("runs/sst2/model")      # raises, naming what is missing
    push_folder("runs/sst2/model", "user/linformer-sst2", private=False)

or from the shell: `python -m subquadratic.training.hub runs/sst2/model user/linformer-sst2`.

A complete folder loads anywhere, with or without this package installed: safetensors weights, `config.json`
with an `auto_map` whose code files are all there (the files `save_pretrained` of the package writes, and the
modules they import), a tokenizer, and a README.md model card whose metadata parses. Pushing needs a token
(`hf auth login`, or HF_TOKEN); every failure (no token, offline mode, no network, a refused upload) is a
`HubError` with a one-line message."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

import huggingface_hub
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
LOGIN_HINT = "run `hf auth login` or set the HF_TOKEN environment variable"
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import\s", re.MULTILINE)


class HubError(RuntimeError):
    """A push that cannot happen or did not go through; the message is one line and says what to do."""


class IncompleteFolderError(ValueError):
    """A folder that lacks something a hub repository of the package needs."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exceptions of the HTTP clients `huggingface_hub` may use (httpx2, httpx, requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------- completeness

def _missing_weights(folder: str) -> list[str]:
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return []
    index = os.path.join(folder, WEIGHTS_INDEX)
    if not os.path.isfile(index):
        other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                 if os.path.isfile(os.path.join(folder, f))]
        note = f" ({', '.join(other)} is not safetensors: save with safe_serialization=True)" if other else ""
        return [f"safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}){note}"]
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        return [f"a readable {WEIGHTS_INDEX} ({_first_line(e)})"]
    return [f"weight shard {s}" for s in shards if not os.path.isfile(os.path.join(folder, s))]


def _missing_code(folder: str) -> list[str]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return ["config.json"]
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return [f"a readable config.json ({_first_line(e)})"]
    auto_map = config.get("auto_map")
    if not auto_map:
        return ["`auto_map` in config.json (the folder would not load with trust_remote_code; save it with the "
                "model's save_pretrained)"]
    missing, pending, seen = [], [], set()
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, (list, tuple)) else [reference]:
            if ref:
                pending.append(ref.split("--")[-1].rpartition(".")[0])
    while pending:  # the modules auto_map names, and the modules they import (`from .name import X`)
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        file = os.path.join(folder, module + ".py")
        if not os.path.isfile(file):
            missing.append(f"code file {module}.py")
            continue
        with open(file, encoding="utf-8") as f:
            pending.extend(RELATIVE_IMPORT.findall(f.read()))
    return missing


def _missing_tokenizer(folder: str) -> list[str]:
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")) or not any(
            os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return ["a tokenizer (tokenizer_config.json and tokenizer.json; save it with tokenizer.save_pretrained)"]
    return []


def _missing_card(folder: str) -> list[str]:
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return ["README.md (the model card)"]
    try:
        card = ModelCard.load(path)
    except Exception as e:  # huggingface_hub raises several kinds for a bad header
        return [f"a model card whose metadata parses (README.md: {_first_line(e)})"]
    if not card.data.library_name:
        return ["`library_name` in the model card's metadata"]
    return []


def check_folder_is_complete(folder: str | os.PathLike) -> list[str]:
    """Checks that ``folder`` holds all a hub repository of the package needs (see the module docstring).
    Returns the files it holds; raises `IncompleteFolderError` naming everything that is missing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise IncompleteFolderError(f"{folder!r} is not a folder")
    missing = _missing_weights(folder) + _missing_code(folder) + _missing_tokenizer(folder) + _missing_card(folder)
    if missing:
        raise IncompleteFolderError(f"{folder} is not complete for the hub: missing {'; '.join(missing)}")
    return sorted(os.listdir(folder))


# -------------------------------------------------------------------------------------------------------- push

def check_push_ready(repo_id: str, token: str | None = None) -> str:
    """What can be checked before a long run without the network: a valid repository id, a token, and no offline
    mode. Returns the token; raises `HubError`."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a hub repository id (expected USER/NAME): {_first_line(e)}") from None
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the hub")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token; {LOGIN_HINT}")
    return token


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str | None = None) -> str:
    """Uploads a complete saved folder to the model repository ``repo_id`` (created if needed) and returns its
    URL. Raises `IncompleteFolderError` before any upload, and `HubError` with a one-line message when there is
    no token or the hub cannot be reached or refuses."""
    folder = os.fspath(folder)
    check_folder_is_complete(folder)
    token = check_push_ready(repo_id, token)
    api = HfApi(token=token)
    endpoint = api.endpoint
    again = f"push again with `python -m subquadratic.training.hub {folder} {repo_id}`"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or "Upload subquadratic model")
    except OfflineModeIsEnabled:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it and {again}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            reason = f"the hub refused the token (HTTP {status}); {LOGIN_HINT} with a token that can write"
        else:
            reason = f"the hub answered HTTP {status}: {_first_line(e)}"
        raise HubError(f"cannot push to {repo_id}: {reason}; then {again}") from None
    except _network_errors() as e:
        raise HubError(f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {_first_line(e)}); "
                       f"check the network and {again}") from None
    return str(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m subquadratic.training.hub",
                                     description="Upload a saved model folder to the Hugging Face Hub.")
    parser.add_argument("folder", help="a save_pretrained folder written by subquadratic-train/-finetune")
    parser.add_argument("repo_id", help="USER/NAME of the model repository (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    args = parser.parse_args(argv)
    try:
        url = push_folder(args.folder, args.repo_id, private=args.private)
    except (HubError, IncompleteFolderError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"pushed {args.folder} to {url}")


if __name__ == "__main__":
    main(sys.argv[1:])
