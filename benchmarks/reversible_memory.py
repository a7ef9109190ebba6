"""Peak memory of one Reformer-LM training step against depth, reversible vs ordinary residual layers (CPU).

Two measures per case, each case in a fresh subprocess:
  * activations: bytes of the tensors autograd keeps for the backward pass (counted with
    `torch.autograd.graph.saved_tensors_hooks`, each storage once) -- exact and machine-independent;
  * peak RSS: growth of the process' peak resident memory over the step (ru_maxrss after - before).

    python benchmarks/reversible_memory.py                  # 2, 6, 12 layers at 4096 tokens
    python benchmarks/reversible_memory.py --length 2048 --layers 2 6 12 24
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one_case(layers: int, reversible: bool, length: int) -> dict:
    import torch

    from subquadratic import ReformerLMConfig, ReformerLMForCausalLM

    torch.manual_seed(0)
    config = ReformerLMConfig(hidden_size=256, num_attention_heads=4, attention_head_size=64,
                              num_hidden_layers=layers, lsh_chunk_length=64, local_chunk_length=64, num_buckets=64,
                              num_hashes=2, intermediate_size=1024, chunk_size_feed_forward=0,
                              axial_pos_shape=[64, 64], axial_pos_embds_dim=[64, 192], reversible=reversible)
    model = ReformerLMForCausalLM(config).train()
    x = torch.randint(0, 256, (1, length))
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layers": layers, "reversible": reversible, "length": length,
            "activations_mib": sum(saved.values()) / 2**20, "peak_rss_growth_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6, 12])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # layers reversible length, run in a subprocess
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(int(args.case[0]), args.case[1] == "1", int(args.case[2]))))
        return
    rows = []
    for layers in args.layers:
        for reversible in (True, False):
            out = subprocess.run([sys.executable, __file__, "--case", str(layers), str(int(reversible)),
                                  str(args.length)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| layers | reversible | activations kept for backward (MiB) | peak RSS growth (MiB) |")
    print("|---:|:---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {'yes' if r['reversible'] else 'no'} | {r['activations_mib']:.1f} | "
              f"{r['peak_rss_growth_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
