"""Keeps `benchmarks/gpu_speed.py` from rotting: its `--quick` smoke run on CPU (tiny sizes) writes the JSON it
promises, and without a GPU a full run exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_speed.py"
CONTENDERS = ["ours-reformer", "ours-longformer", "ours-longformer-global", "ours-longformer-dilated",
              "ours-linformer", "ours-reformer-readable", "ours-longformer-readable", "ours-linformer-readable", "hf-reformer", "hf-longformer", "sdpa-full", "sdpa-full-causal", "flex-sliding",
              "pkg-reformer-pytorch", "pkg-linformer", "pkg-local-attention"]
ALWAYS_RUN = [c for c in CONTENDERS if not c.startswith(("pkg-", "flex-"))]  # need nothing beyond the package
ROW_FIELDS = {"contender", "length", "dtype", "mode", "status", "tokens_per_s", "median_s", "times_s",
              "first_step_s", "peak_gib", "parameters", "first_loss", "repeats"}


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_speed") / "quick.json"
    markdown = path.with_suffix(".md")
    out = _run("--quick", "--lengths", "256", "--dtypes", "bf16", "--modes", "train", "eval", "--json", str(path),
               "--markdown", str(markdown))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(path.read_text()), out.stdout, markdown.read_text()


def test_quick_writes_one_row_per_case(quick):
    data, _, _ = quick
    cases = {(r["contender"], r["length"], r["dtype"], r["mode"]) for r in data["rows"]}
    assert len(cases) == len(data["rows"]) == len(CONTENDERS) * 2
    assert cases == {(c, 256, "bf16", m) for c in CONTENDERS for m in ("train", "eval")}
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row), row


def test_quick_rows_are_measured_or_skipped_for_a_reason(quick):
    data, _, _ = quick
    cuda = torch.cuda.is_available()
    for row in data["rows"]:
        status = row["status"]
        if row["contender"] in ALWAYS_RUN or (cuda and row["contender"] == "flex-sliding"):
            assert status == "ok", row
        elif row["contender"] == "flex-sliding":
            assert status == "skipped (needs CUDA)", row
        else:
            assert status in ("ok", "skipped (not installed)"), row
        if status == "ok":
            assert row["tokens_per_s"] > 0 and row["median_s"] > 0 and row["first_step_s"] > 0, row
            assert row["repeats"] == len(row["times_s"]) == 1 and row["parameters"] > 0, row
            assert 4.0 < row["first_loss"] < 7.0, row  # cross-entropy of an untrained model over 256 tokens
            assert (row["peak_gib"] is not None) == cuda, row
        else:
            assert row["tokens_per_s"] is None and row["times_s"] == [], row


def test_quick_reports_environment_ratios_and_crossover(quick):
    data, stdout, markdown = quick
    env = data["environment"]
    assert env["quick"] and env["size"]["layers"] == 2 and env["command"].startswith("python ")
    assert {"device", "torch", "transformers", "date"} <= set(env)
    by_model = {(e["model"], e["mode"]): e for e in data["ratios"]}
    assert by_model["ours-reformer", "train"]["vs"]["hf"]["contender"] == "hf-reformer"
    assert isinstance(by_model["ours-longformer", "eval"]["vs"]["sdpa"]["ratio"], float)
    assert data["crossover"]["ours-linformer"]["vs"] == "sdpa-full"
    assert data["crossover"]["ours-reformer"]["vs"] == "sdpa-full-causal"
    assert markdown.strip() and markdown.strip() in stdout  # the report is what the run ends with
    assert stdout.rstrip().endswith(markdown.strip().splitlines()[-1])
    assert "| ours-reformer | 256 | bf16 | train |" in markdown and "crossover (train bf16)" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_gpu_a_full_run_exits_cleanly():
    out = _run("--lengths", "1024")
    assert out.returncode == 0 and "no CUDA GPU" in out.stdout, out.stdout + out.stderr


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_growth_exponents_and_the_report_of_a_saved_run(tmp_path):
    gpu_speed = _load_script()
    rows = [dict(contender=name, length=n, dtype="bf16", mode="train", status="ok", tokens_per_s=n / t,
                 median_s=t, times_s=[t], first_step_s=t, peak_gib=m, parameters=1, first_loss=1.0, repeats=1)
            for name, scale in (("linear", 1), ("quadratic", 2))
            for n, t, m in [(n, 1e-9 * n ** scale, 1e-6 * n ** scale) for n in (4096, 16384, 65536)]]
    growth = gpu_speed.growth_exponents(rows)
    assert growth["linear"]["memory"] == pytest.approx(1.0) and growth["quadratic"]["time"] == pytest.approx(2.0)
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dict(environment=dict(device="X", torch="t", cuda="c", transformers="v", date="d",
                                                      command="cmd", shape="s", warmup=1, repeats=1,
                                                      float32_matmul_precision="highest", packages="none"),
                                     rows=rows)))
    out = _run("--report-from", str(saved))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "- quadratic: memory 2.00, step time 2.00" in out.stdout


def test_graphed_contenders_compare_with_graphed_baselines_where_measured():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed_for_test", SCRIPT)
    gs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gs  # its dataclasses look their module up
    spec.loader.exec_module(gs)
    versus = gs.comparisons({"ours-longformer+graph", "ours-longformer", "flex-sliding+graph", "hf-longformer"})
    assert versus["ours-longformer+graph"] == {"hf": "hf-longformer", "pkg": "pkg-local-attention",
                                               "sdpa": "sdpa-full", "flex": "flex-sliding+graph"}
    assert versus["ours-longformer"]["flex"] == "flex-sliding"
    assert "flex-sliding+graph" not in versus  # not one of ours
    assert gs._order("ours-longformer") < gs._order("ours-longformer+graph") < gs._order("ours-longformer-global")


def test_graphed_contenders_need_cuda_and_train_mode(tmp_path):
    path = tmp_path / "graph.json"
    out = _run("--quick", "--contenders", "ours-linformer+graph", "--lengths", "256", "--dtypes", "bf16",
               "--modes", "train", "eval", "--json", str(path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    status = {r["mode"]: r["status"] for r in json.loads(path.read_text())["rows"]}
    if torch.cuda.is_available():
        assert status == {"train": "ok", "eval": "skipped (graphs: train only)"}, status
    else:
        assert status == {"train": "skipped (needs CUDA)", "eval": "skipped (needs CUDA)"}, status
