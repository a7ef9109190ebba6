"""Where a training step's GPU time goes: the kernels of one bf16 training step of gpu_speed's contenders, from
`torch.profiler`, sorted by total device time (after warm-up steps, so compilation is not in it).

    python benchmarks/profile_step.py --contenders ours-longformer flex-sliding --length 16384

With ``--python N``, also the N Python functions with the most time of their own in one step under cProfile (for
steps that are launch-bound: where the host spends the time the GPU waits). Every profile also reports the host
time of one step (until its last launch returns, before the GPU is waited for) and the points where the step makes
the host wait for the GPU (`torch.cuda.set_sync_debug_mode`): each drains the queue of launched kernels, after
which the GPU idles through every launch that follows.

Needs a CUDA GPU (prints a message and exits 0 without one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def python_profile(step, rows: int) -> str:
    """cProfile of one step (synchronised at its end): the functions with the most time of their own, and the
    most cumulative time."""
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    profiler.enable()
    step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def host_time_and_syncs(step) -> tuple[float, list[str]]:
    """One step's host time in ms (from its start until it returns, without waiting for the GPU) and where it
    synchronised with the GPU: one line per distinct place (the innermost frames outside torch), with counts."""
    import time
    import traceback
    import warnings
    from collections import Counter

    import torch

    torch.cuda.synchronize()
    begin = time.perf_counter()
    step()
    host = (time.perf_counter() - begin) * 1000
    torch.cuda.synchronize()
    places: Counter = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings.py" not in f.filename]
        places[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return host, [f"{count} x {place}" for place, count in places.most_common()]


def profile(name: str, length: int, rows: int, python_rows: int = 0) -> str:
    import gpu_speed as gs
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from subquadratic.modeling.attention.flex import set_fast_paths

    set_fast_paths(gs.FORCED_PATHS.get(name))
    model, loss_fn = gs.CONTENDERS[name](name, length)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):  # unprofiled wall time of a step, to compare with the kernels' sum (launch-bound or not)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        walls.append(begin.elapsed_time(end))
    wall = sorted(walls)[len(walls) // 2]
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # the kernels themselves
    total = sum(e.self_device_time_total for e in on_device) / 1000
    kernels = sum(e.count for e in on_device)
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    python = python_profile(step, python_rows) if python_rows else ""
    host, syncs = host_time_and_syncs(step)
    sync_lines = "".join(f"\n  {line}" for line in syncs) or " none"
    model.zero_grad(set_to_none=True)  # the model itself goes with this frame
    return (f"### {name} at {length} tokens: step {wall:.1f} ms (median of 5, unprofiled), {total:.1f} ms of "
            f"kernels in {kernels} launches ({100 * total / wall:.0f}% busy); host {host:.1f} ms until the last "
            f"launch; synchronisations:{sync_lines}\n{table}\n{python}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", nargs="+", default=["ours-longformer", "flex-sliding"])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per contender")
    parser.add_argument("--python", type=int, default=0, metavar="N",
                        help="also list the N Python functions with the most host time in one step (cProfile)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    if not torch.cuda.is_available():
        print("profile_step: no CUDA GPU here, nothing to profile (exit 0).")
        return 0
    import gpu_speed as gs

    gs.DEVICE, gs.SIZE = torch.device("cuda"), gs.FULL
    for name in args.contenders:
        print(profile(name, args.length, args.rows, args.python), flush=True)
        torch.cuda.empty_cache()  # the last contender's model is gone with its frame
    return 0


if __name__ == "__main__":
    sys.exit(main())
