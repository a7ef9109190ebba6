"""One training step (forward + backward) of the Longformer-style encoder against transformers' `LongformerModel`
of the same size, on CPU (or a GPU with `--device cuda`), at several lengths.

Both models: 2 layers, hidden 256, 4 heads, feed-forward 1024, window 256 (128 tokens each side), no dilation,
global attention on the first token, batch 1, fp32, dropout 0.1 (training mode); the loss is the mean square of
the last hidden states (no LM head, so the vocabulary does not weigh in). Each case runs in a fresh subprocess and
reports:
  * step time: the fastest of the timed steps (after one untimed first step), the measure least disturbed
    by other load on a shared machine (the load average is printed with the table);
  * peak memory growth: ru_maxrss after the first step minus before it (model already built); with
    `--device cuda`, torch.cuda.max_memory_allocated over the first step minus the memory allocated before it;
  * activations: bytes of the tensors autograd keeps for the backward pass, each storage counted once
    (`torch.autograd.graph.saved_tensors_hooks`) -- exact and machine-independent.

    python benchmarks/longformer_cpu.py                         # 1K, 4K, 16K tokens, 3 timed steps
    python benchmarks/longformer_cpu.py --lengths 2048 8192 --steps 5 --json rows.json
    python benchmarks/longformer_cpu.py --device cuda --lengths 4096 16384 65536
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024, vocab_size=1000,
            type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
WINDOW = 256
IMPLEMENTATIONS = ("subquadratic", "transformers")


def build(implementation: str, length: int):
    import torch

    torch.manual_seed(0)
    if implementation == "subquadratic":
        from subquadratic import LongformerStyleConfig, LongformerStyleModel

        return LongformerStyleModel(LongformerStyleConfig(**SIZE, attention_window=WINDOW,
                                                          max_position_embeddings=length + 2))
    from transformers import LongformerConfig, LongformerModel

    return LongformerModel(LongformerConfig(**SIZE, attention_window=WINDOW, max_position_embeddings=length + 2),
                           add_pooling_layer=False)


def one_case(implementation: str, length: int, steps: int, device: str) -> dict:
    import torch

    model = build(implementation, length).to(device).train()
    input_ids = torch.randint(3, SIZE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, 0] = 1
    cuda = device.startswith("cuda")
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(record: bool) -> float:
        start = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack if record else (lambda t: t), lambda t: t)
        with hooks:
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        global_attention_mask=global_attention_mask).last_hidden_state
        out.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_mib() -> float:  # peak RSS on CPU, peak allocated GPU memory on CUDA
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else peak_mib()
    first = step(record=True)
    peak = peak_mib()
    times = [step(record=False) for _ in range(steps)] or [first]
    return {"implementation": implementation, "length": length, "device": device, "step_s": min(times),
            "peak_growth_mib": peak - before, "activations_mib": sum(saved.values()) / 2**20,
            "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one untimed step)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA the memory column is the "
                                                             "peak of torch.cuda.max_memory_allocated over the step")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # implementation length steps (subprocess)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), int(args.case[2]), args.device)))
        return
    rows, load_before = {}, os.getloadavg()[0]
    for length in args.lengths:
        for implementation in IMPLEMENTATIONS:
            out = subprocess.run([sys.executable, __file__, "--case", implementation, str(length), str(args.steps),
                                  "--device", args.device],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{implementation} at {length} tokens failed:\n{out.stderr}")
            rows[implementation, length] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(rows.values()))
    print(f"parameters: {first['parameters']:,} per model; torch threads: {first['threads']}; "
          f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    memory = "peak CUDA memory growth" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"| tokens | step time (s) subquadratic | step time (s) transformers | {memory} (MiB) subquadratic"
          f" | {memory} (MiB) transformers | activations (MiB) subquadratic | activations (MiB) transformers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        ours, theirs = rows["subquadratic", length], rows["transformers", length]
        print(f"| {length} | {ours['step_s']:.3f} | {theirs['step_s']:.3f} | {ours['peak_growth_mib']:.0f} | "
              f"{theirs['peak_growth_mib']:.0f} | {ours['activations_mib']:.0f} | {theirs['activations_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(rows.values()), f, indent=1)


if __name__ == "__main__":
    main()
