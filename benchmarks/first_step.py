"""First-step time of the compiled GPU fast paths, with an empty and with a filled compilation cache (issue 9).

The FlexAttention paths are compiled (torch.compile + inductor) at the first step of each new shape. Inductor keeps
what it builds on disk (TORCHINDUCTOR_CACHE_DIR), so only the first process on a machine pays the whole cost; this
script measures both cases: each (contender, length) runs twice in a fresh process sharing one new cache folder,
"cold" (empty cache) then "warm" (filled by the cold run). A process runs `gpu_speed.run_case` (bf16 autocast
training step, gpu_speed's shapes: first step, second step, then timed steps) at each of `--lengths` in turn, so
the second length shows what a new length costs in a running process. The child also reports dynamo's
count of compiled graphs and its compile-time breakdown, and, while a step is running, dumps every thread's stack
to its stderr every `--stack-every` seconds (kept in `--logs`), so a step that never ends shows where it waits.

    python benchmarks/first_step.py --contenders ours-reformer ours-longformer flex-sliding --lengths 16384 65536

`--cache-dir` keeps the compiled kernels (for a later `gpu_speed.py` run with TORCHINDUCTOR_CACHE_DIR set to it).

Needs a CUDA GPU (prints a message and exits 0 without one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(name: str, lengths: list[int], stack_every: float) -> None:
    import faulthandler

    if stack_every > 0:
        faulthandler.dump_traceback_later(stack_every, repeat=True, file=sys.stderr)
    sys.path.insert(0, str(HERE))
    import gpu_speed as gs
    import torch

    gs.DEVICE, gs.SIZE = torch.device("cuda"), gs.FULL
    gs._warm_device()
    from torch._dynamo.utils import compile_times, counters

    for length in lengths:
        start = time.perf_counter()
        row = gs.run_case(name, length, "bf16", "train", warmup=2, repeats=3, limit=1e9)
        row.update(length=length, case_seconds=time.perf_counter() - start,
                   unique_graphs=counters["stats"]["unique_graphs"], compile_times=compile_times(repr="str"))
        print("RESULT " + json.dumps(row), flush=True)
    faulthandler.cancel_dump_traceback_later()


def run_child(name: str, lengths: list[int], cache: str, args, label: str) -> list[dict]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               PYTHONUNBUFFERED="1")
    if args.torch_logs:
        env["TORCH_LOGS"] = args.torch_logs
    command = [sys.executable, __file__, "--child", name, ",".join(map(str, lengths)),
               "--stack-every", str(args.stack_every)]
    start = time.perf_counter()
    log = Path(args.logs) / f"{name}-{label}.log" if args.logs else None
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        out, err, status = done.stdout, done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        err = error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        status = f"timed out after {args.timeout:.0f} s"
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out + "\n--- stderr ---\n" + err)
    done = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT "):])
            done[row["length"]] = row
    results = []
    for order, length in enumerate(lengths):
        result = dict(contender=name, length=length, cache=label, order=order,
                      status="ok" if length in done else status, process_seconds=time.perf_counter() - start)
        result.update(done.get(length, {}))
        results.append(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", nargs="+", default=["ours-reformer", "ours-longformer", "flex-sliding"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to each process")
    parser.add_argument("--stack-every", type=float, default=60.0, help="seconds between stack dumps (0: none)")
    parser.add_argument("--torch-logs", default="", help="TORCH_LOGS for the children, e.g. recompiles")
    parser.add_argument("--logs", help="folder for each child's stdout and stderr")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-warm", action="store_true", help="only the cold run")
    parser.add_argument("--cache-dir", help="inductor cache folder to use and keep (default: a temporary one per "
                        "contender); it must start empty for the cold run to be cold")
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], [int(x) for x in args.child[1].split(",")], args.stack_every)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("first_step: no CUDA GPU here, nothing to measure (exit 0).")
        return 0
    results = []
    for name in args.contenders:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as temporary:
            cache = os.path.join(args.cache_dir, name) if args.cache_dir else temporary
            for label in ("cold",) if args.no_warm else ("cold", "warm"):
                rows = run_child(name, args.lengths, cache, args, label)
                results.extend(rows)
                for r in rows:
                    first = r.get("first_step_s")
                    print(f"{name} {r['length']} {label}: {r['status']}, process {r['process_seconds']:.1f} s"
                          + ("" if first is None else f", first step {first:.1f} s, "
                             f"{r['tokens_per_s']:,.0f} tok/s, graphs {r['unique_graphs']}"), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
                if any(r["status"] != "ok" for r in rows):
                    break  # a warm run after a failed cold one measures nothing new
    print("\n| contender | length | cache | first step s | tok/s | status |\n|---|---:|---|---:|---:|---|")
    for r in results:
        first = "-" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}"
        tps = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
        print(f"| {r['contender']} | {r['length']} | {r['cache']} | {first} | {tps} | {r['status']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
