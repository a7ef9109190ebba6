"""The five-minute tour: build a tiny byte-level Reformer-LM, train it for a few steps on the bundled text, save
it, reload it with `AutoModelForCausalLM.from_pretrained`, and generate a line.

    subquadratic-quickstart                 # or: python -m subquadratic.training.quickstart
    subquadratic-quickstart --steps 300 --output outputs/quickstart
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch
from transformers import AutoModelForCausalLM

from ..configuration.reformer import ReformerLMConfig
from ..modeling.reformer import ReformerLMForCausalLM


def bundled_text() -> bytes:
    return resources.files("subquadratic.training").joinpath("data/tiny_shakespeare.txt").read_bytes()


def tiny_config() -> ReformerLMConfig:
    return ReformerLMConfig(vocab_size=256, hidden_size=128, num_attention_heads=4, attention_head_size=32,
                            attn_layers=["local", "lsh", "local", "lsh"], lsh_chunk_length=32, local_chunk_length=32,
                            num_buckets=8, num_hashes=2, intermediate_size=256, axial_pos_shape=[16, 16],
                            axial_pos_embds_dim=[32, 96], hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--seq-len", type=int, default=256, help="bytes per training sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output", default="outputs/quickstart", help="folder for the saved model")
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seq_len > 256:
        parser.error(f"--seq-len {args.seq_len}: the tiny model takes at most 256 bytes")

    torch.manual_seed(args.seed)
    data = torch.tensor(list(bundled_text()), dtype=torch.long)
    model = ReformerLMForCausalLM(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"Reformer-LM, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data) / 1024:.0f} KiB of bundled text")
    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(data) - args.seq_len, (args.batch_size,))
        batch = torch.stack([data[o:o + args.seq_len] for o in offsets.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  bits/byte {loss.item() / 0.6931:.2f}  "
                  f"{time.time() - start:.0f}s")

    model.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
    prompt = torch.tensor([list(args.prompt.encode())])
    generated = reloaded.generate(prompt, max_new_tokens=80, do_sample=True, top_k=10, pad_token_id=0)
    print(f"saved to {args.output}; reloaded as {type(reloaded).__name__}; a sample:")
    print(bytes(generated[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
