"""Run by `test_fsdp.py` under `torch.distributed.run` with 2 CPU processes (gloo): one training step of each model
sharded with FSDP2 (`fully_shard`), each process on its own half of the batch, against the same model unsharded on
the whole batch in every process. Gradients (averaged over processes by FSDP) must match. Exits non-zero if not."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from subquadratic import (
    LinformerConfig,
    LinformerForMaskedLM,
    LongformerStyleConfig,
    LongformerStyleForMaskedLM,
    ReformerLMConfig,
    ReformerLMForCausalLM,
)

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODELS = {
    # reversible layers whose backward pass recomputes the blocks; fixed rotations, so both runs hash alike
    "reformer": (ReformerLMForCausalLM, ReformerLMConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16, num_hidden_layers=2,
        intermediate_size=64, lsh_chunk_length=16, local_chunk_length=16, num_buckets=4, num_hashes=2,
        max_position_embeddings=64, axial_pos_shape=[8, 8], axial_pos_embds_dim=[8, 24], hash_seed=1, **NO_DROPOUT)),
    # global projections unused without global tokens: their gradient stays None in both
    "longformer": (LongformerStyleForMaskedLM, LongformerStyleConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
        attention_window=16, max_position_embeddings=80, pad_token_id=0, **NO_DROPOUT)),
    "linformer": (LinformerForMaskedLM, LinformerConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
        max_position_embeddings=64, projected_length=16, pad_token_id=0, **NO_DROPOUT)),
}


def check(name: str, rank: int, world: int) -> None:
    model_class, config = MODELS[name]
    torch.manual_seed(0)
    reference = model_class(config)
    sharded = model_class(config)
    sharded.load_state_dict(reference.state_dict())
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    x = torch.randint(1, 64, (2 * world, 64), generator=torch.Generator().manual_seed(1))
    mine = x[2 * rank:2 * rank + 2]
    sharded(mine, labels=mine).loss.backward()
    reference(x, labels=x).loss.backward()  # equal token counts: the mean loss is the mean of the processes' losses
    for (n, p), (_, q) in zip(sharded.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, f"{name}: {n} has a gradient only when sharded"
            continue
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {n}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for model_name in sys.argv[1:]:
        check(model_name, dist.get_rank(), dist.get_world_size())
    dist.barrier()
    dist.destroy_process_group()
    # Every check passed (a failure raised above). Leave without the interpreter's teardown: in about one run in
    # seven a thread left by the process group or autograd aborted it ("terminate called without an active
    # exception", SIGABRT) after destroy_process_group had returned, failing a run whose checks all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
