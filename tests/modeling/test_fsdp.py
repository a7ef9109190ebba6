"""FSDP2 (`fully_shard`, what `subquadratic-train --fsdp true` uses) gives the same gradients as the unsharded model,
reversible layers included; FSDP1's flattened parameters are refused by the reversible layers rather than left
untrained. The sharded runs are two CPU processes (gloo), see `fsdp_worker.py`."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from subquadratic.modeling.layers.reversible import ReversibleStack


def test_fsdp2_gradients_equal_the_unsharded_model():
    worker = Path(__file__).with_name("fsdp_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", str(worker), "reformer", "longformer", "linformer"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_reversible_layers_refuse_parameters_moved_off_their_modules():
    stack = ReversibleStack([nn.Linear(4, 4)], [nn.Linear(4, 4)])
    for linear in (stack.f_blocks[0], stack.g_blocks[0]):  # as FSDP1 with use_orig_params=False leaves them
        weight, bias = linear.weight, linear.bias
        del linear.weight, linear.bias
        linear.weight, linear.bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="use FSDP2"):
        stack(x, x)
