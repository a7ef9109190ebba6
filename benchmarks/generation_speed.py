"""Cached incremental decoding speed: the package's causal models against `transformers`' Reformer `generate()`.

Same shape for every contender (default: 6 layers, hidden 512, 8 heads of 64, feed-forward 2048, vocabulary 256,
local/LSH layers alternating with chunks of 64 and 4 hash rounds, Longformer-style causal window 512); random
weights (seed 0), a random prompt of `--prompt` tokens, then `--new` tokens by greedy `generate()` with the cache.
Reported: prompt time (the first `generate` step, prefill), decoding tokens/s (the new tokens after the first over
the rest of the time) and peak memory, median of `--repeats` runs after one warm-up, in one process.

    python benchmarks/generation_speed.py                          # GPU if there is one, else CPU
    python benchmarks/generation_speed.py --prompt 256 --new 32 --small    # a quick CPU run
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import transformers


def axial(length: int) -> list[int]:
    side = 2 ** (max(1, length.bit_length() - 1) // 2)
    return [side, -(-length // side)]


def contenders(size: dict, max_len: int) -> dict:
    from subquadratic import (
        LongformerStyleConfig,
        LongformerStyleForCausalLM,
        ReformerLMConfig,
        ReformerLMForCausalLM,
    )

    layers = ["local", "lsh"] * (size["layers"] // 2)
    shape = axial(max_len)
    dims = [size["hidden"] // 4, size["hidden"] - size["hidden"] // 4]
    buckets = 2 ** max(1, round(torch.log2(torch.tensor(2.0 * max_len / size["chunk"])).item()))
    ours_reformer = ReformerLMConfig(
        vocab_size=256, hidden_size=size["hidden"], num_attention_heads=size["heads"],
        attention_head_size=size["hidden"] // size["heads"], attn_layers=layers, lsh_chunk_length=size["chunk"],
        local_chunk_length=size["chunk"], num_buckets=buckets, num_hashes=size["hashes"], is_decoder=True,
        intermediate_size=4 * size["hidden"], max_position_embeddings=max_len, axial_pos_shape=shape,
        axial_pos_embds_dim=dims, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        eos_token_id=2)
    hf_reformer = transformers.ReformerConfig(
        vocab_size=256, hidden_size=size["hidden"], num_attention_heads=size["heads"],
        attention_head_size=size["hidden"] // size["heads"], attn_layers=layers, feed_forward_size=4 * size["hidden"],
        lsh_attn_chunk_length=size["chunk"], local_attn_chunk_length=size["chunk"], num_buckets=buckets,
        num_hashes=size["hashes"], is_decoder=True, max_position_embeddings=max_len, axial_pos_embds=True,
        axial_pos_shape=shape, axial_pos_embds_dim=dims, hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=2)
    ours_longformer = LongformerStyleConfig(
        vocab_size=256, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"], attention_window=size["window"],
        is_decoder=True, max_position_embeddings=max_len + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, eos_token_id=2)
    return {"ours-reformer": lambda: ReformerLMForCausalLM(ours_reformer),
            "hf-reformer": lambda: transformers.ReformerModelWithLMHead(hf_reformer),
            "ours-longformer-causal": lambda: LongformerStyleForCausalLM(ours_longformer)}


def measure(make, prompt: torch.Tensor, new: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = make().to(device).eval()
    cuda = device.type == "cuda"

    def run(max_new: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 use_cache=True, pad_token_id=model.config.pad_token_id)
        if cuda:
            torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + max_new
        return time.perf_counter() - start

    run(2)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prefill = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new) for _ in range(repeats))
    return dict(prefill_s=prefill, decode_tok_s=(new - 1) / max(total - prefill, 1e-9),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="2 layers, hidden 128, 2 heads, window 128, 2 hashes")
    p.add_argument("--contenders", nargs="+", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = (dict(layers=2, hidden=128, heads=2, chunk=64, hashes=2, window=128) if args.small else
            dict(layers=6, hidden=512, heads=8, chunk=64, hashes=4, window=512))
    transformers.logging.set_verbosity_error()
    max_len = args.prompt + args.new
    prompt = torch.randint(3, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    print(f"## generation_speed: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} | torch "
          f"{torch.__version__} | transformers {transformers.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
          f"shape {size}; prompt {args.prompt}, {args.new} new tokens, greedy, cache on; median of {args.repeats}\n")
    print("| contender | prefill s | decoding tok/s | peak GiB |\n|---|---:|---:|---:|")
    for name, make in contenders(size, max_len).items():
        if args.contenders and name not in args.contenders:
            continue
        try:
            r = measure(make, prompt, args.new, args.repeats, device)
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"| {name} | {r['prefill_s']:.3f} | {r['decode_tok_s']:,.1f} | {peak} |", flush=True)
        except Exception as error:  # noqa: BLE001 -- a failing contender is a result
            print(f"| {name} | error: {type(error).__name__}: {str(error)[:100]} | | |", flush=True)


if __name__ == "__main__":
    main()
