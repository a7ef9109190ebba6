"""Training and inference speed and peak memory of the package's models against their contenders, side by side in
one process on one GPU (issue 9).

Every contender has the same shape: 6 layers, hidden 512, 8 heads of 64, feed-forward 2048, vocabulary 256,
batch 1, dropout 0; lengths 1K, 4K, 16K, 64K tokens; bf16 autocast (fp32 weights) and fp32 (default matmul
precision, so no TF32 unless the environment enables it); a training step (forward + loss + backward, gradients
set to None before each step, no optimizer) and an eval forward (forward + loss under `torch.no_grad()`, eval
mode). Losses: causal LMs (Reformers, `sdpa-full-causal`) take next-token cross-entropy over every position;
encoders (Longformers, Linformers, `sdpa-full`, `flex-sliding`, `pkg-local-attention`) take masked-LM
cross-entropy from their MLM head over the full logits with labels = the input ids at 15% random positions and
-100 elsewhere (inputs are not masked: this measures cost, not learning). Logits are upcast to fp32 for every loss.

Per case (contender, length, dtype, mode): a fresh model (seed 0); `--warmup` untimed steps, the first of which
is reported as the first-step time (it includes torch.compile and autotuning where there are any); then
`--repeats` timed steps (CUDA events), of which the median gives tokens/s; peak memory is
`torch.cuda.max_memory_allocated()` over the whole case (weights, gradients and activations), reset before the
model is built. A case that runs out of memory is recorded as "OOM" (and longer lengths of that contender, dtype
and mode as "skipped (OOM at shorter)"); one that cannot fit its warm-up and repeats into
`--max-seconds-per-case` keeps the timed steps it got and makes longer lengths of that contender (and its costlier
dtype and mode: fp32 >= bf16, train >= eval) "skipped (slow)". No case starts after `--budget-seconds`: the rest
are "not run (budget)". Cases run most informative first: train bf16 at lengths >= 16K (ascending), then the
shorter ones (descending), then train fp32, eval bf16, eval fp32 in the same length order.

Contenders (`--contenders`; all by default):
  ours-reformer            ReformerLMForCausalLM: layers alternating local/LSH, chunks 64, 4 hash rounds,
                           buckets = the power of two nearest 2L/64, axial positions (two factors of L, dims 128+384)
  ours-longformer          LongformerStyleForMaskedLM, window 512 (256 each side), no global tokens
  ours-longformer-global   the same with the first 4 tokens global (`global_attention_mask`; the config's
                           `max_global_tokens` = 4 from 2026-12-01 on, so that its step can be recorded)
  ours-longformer-dilated  the same, dilation 2 in half of the heads of every layer, 1 in the others
  ours-linformer           LinformerForMaskedLM, k = 256, one E and F per layer shared by its heads ("headwise",
                           as pkg-linformer), max_position_embeddings = L
  (ours-* run each mechanism's default path on CUDA: FlexAttention for the Reformer and the sliding window, SDPA
  for the Linformer)
  ours-reformer-readable   ours-reformer on its readable PyTorch paths (`fast_paths(False)`)
  ours-linformer-readable  ours-linformer on its readable path
  ours-longformer-readable ours-longformer on its readable path
  hf-reformer              transformers.ReformerModelWithLMHead, the settings of ours-reformer
  hf-longformer            transformers.LongformerForMaskedLM, attention_window 512
  sdpa-full                a plain pre-LN Transformer written here, bidirectional
                           `torch.nn.functional.scaled_dot_product_attention` (the encoders' quadratic baseline)
  sdpa-full-causal         the same, causal (the Reformers' quadratic baseline)
  flex-sliding             the same Transformer with `flex_attention` (wrapped in torch.compile) and a sliding-window
                           block mask |q - k| <= 256, built once per length (the practical ceiling for sliding
                           windows); needs CUDA unless `--flex-on-cpu`. Its block mask comes from the package's
                           eager builder (the same mask as create_block_mask, which compiled for minutes at 16K)
  pkg-reformer-pytorch     reformer_pytorch.ReformerLM, causal, every layer LSH (the package cannot alternate
                           local/LSH layers), bucket_size 64, 4 hashes, ff_chunks 1, axial positions
  pkg-linformer            linformer.LinformerLM, k = 256
  pkg-local-attention      local_attention.LocalTransformer, bidirectional window |q - k| <= 256 (window_size 256,
                           look_backward = look_forward = 1, exact windows), plain residuals, its GEGLU feed-forward
Any contender's name with `+graph` appended (`ours-longformer+graph`) runs its training step recorded as one CUDA
graph and replayed (`subquadratic.training.cuda_graph.CapturedTrainingStep`; gradients zeroed in place instead of
set to None; the first-step time includes one warm-up step and the recording): the launches leave the host, which
bounds the eager steps at 16K and below. Train mode on CUDA only; a model that cannot be recorded (it reads values
back from the GPU, as `transformers`' Reformer and Longformer do) is an error row. A graphed contender of ours is
compared with the graphed version of each contender where that was measured in the run, else the eager one.
The pkg-* packages are imported lazily ("skipped (not installed)" without them). Ratios compare each of ours with
its hf, pkg, sdpa and flex contenders (ours tokens/s / theirs); the crossover is the first length where ours beats
its sdpa baseline in train bf16 (an sdpa OOM where ours ran counts as beating it).

    python benchmarks/gpu_speed.py --json out.json                      # everything, within --budget-seconds
    python benchmarks/gpu_speed.py --contenders ours-reformer hf-reformer sdpa-full-causal --lengths 4096 16384
    python benchmarks/gpu_speed.py --contenders ours-longformer+graph flex-sliding+graph hf-longformer --lengths 16384
    python benchmarks/gpu_speed.py --quick                              # tiny CPU smoke run (seconds)

Without a CUDA GPU the script prints a message and exits 0, unless `--quick` is given. The report (environment,
table, ratios) is printed last; `--json` (rewritten after every case) and `--markdown` keep everything.
"""

from __future__ import annotations

import os
import time

T0 = time.perf_counter()  # the budget counts from here (imports included)
if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation after an OOM

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


@dataclass(frozen=True)
class Size:
    layers: int = 6
    hidden: int = 512
    heads: int = 8
    head_dim: int = 64
    ff: int = 2048
    vocab: int = 256
    batch: int = 1
    window: int = 512  # sliding windows: window / 2 tokens each side
    chunk: int = 64  # Reformer LSH and local chunk length (reformer_pytorch: bucket_size)
    hashes: int = 4
    k: int = 256  # Linformer projected length
    global_tokens: int = 4


FULL = Size()
QUICK = Size(layers=2, hidden=64, heads=2, head_dim=32, ff=256, window=64, chunk=32, hashes=2, k=32)
SIZE = FULL
DEVICE = torch.device("cpu")
FLEX_ON_CPU = False  # --flex-on-cpu: compiled flex_attention runs forward-only on CPU
MLM_FRACTION = 0.15
FIRST_TOKEN_ID = 3  # ids 0..2 are pad/bos/eos in the HF configs; inputs avoid them

FULL_LENGTHS = [1024, 4096, 16384, 65536]
QUICK_LENGTHS = [256, 512]
DTYPES = ("bf16", "fp32")
MODES = ("train", "eval")
BIG = 16384  # lengths from here on run first (ascending); shorter ones after (descending)


# ----------------------------------------------------------------------------------------------------- inputs


def _ids(length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(FIRST_TOKEN_ID, SIZE.vocab, (SIZE.batch, length), generator=g).to(DEVICE)


def _mlm_labels(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(ids.shape[1] + 1)
    chosen = (torch.rand(ids.shape, generator=g) < MLM_FRACTION).to(ids.device)
    return ids.masked_fill(~chosen, -100)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def axial_shape(length: int) -> list[int]:
    """Two factors of `length`, as close to its square root as possible (product == length exactly)."""
    a = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
    return [a, length // a]


def axial_dims() -> list[int]:
    return [SIZE.hidden // 4, SIZE.hidden - SIZE.hidden // 4]  # 128 + 384 at hidden 512


def num_buckets(length: int) -> int:
    """The power of two nearest to 2 L / chunk (at least 2): the Reformer paper's rule, as ReformerLMConfig."""
    return 2 ** max(1, round(math.log2(max(2.0, 2.0 * length / SIZE.chunk))))


def attn_layers() -> list[str]:
    return [("local", "lsh")[i % 2] for i in range(SIZE.layers)]


def _on_device(make):
    """Builds directly on the device (no host copy of big position tables or projections)."""
    with torch.device(DEVICE):
        model = make()
    return model.to(DEVICE)


# ------------------------------------------------------------------------------------------------ contenders
# Each factory: build(name, seq_len) -> (model, loss_fn); loss_fn() runs the forward pass and returns the loss.


def build_ours_reformer(name: str, seq_len: int):
    from subquadratic import ReformerLMConfig, ReformerLMForCausalLM

    config = ReformerLMConfig(
        vocab_size=SIZE.vocab, hidden_size=SIZE.hidden, num_attention_heads=SIZE.heads,
        attention_head_size=SIZE.head_dim, attn_layers=attn_layers(), lsh_chunk_length=SIZE.chunk,
        local_chunk_length=SIZE.chunk, num_buckets=num_buckets(seq_len), num_hashes=SIZE.hashes, is_decoder=True,
        intermediate_size=SIZE.ff, hidden_act="gelu", max_position_embeddings=seq_len,
        axial_pos_shape=axial_shape(seq_len), axial_pos_embds_dim=axial_dims(), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, use_cache=False)
    model = _on_device(lambda: ReformerLMForCausalLM(config))
    ids = _ids(seq_len)
    return model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss


def build_ours_longformer(name: str, seq_len: int):
    from subquadratic import LongformerStyleConfig, LongformerStyleForMaskedLM

    dilation = 1
    if name == "ours-longformer-dilated":
        half = SIZE.heads // 2
        dilation = [[1] * (SIZE.heads - half) + [2] * half for _ in range(SIZE.layers)]  # per layer, per head
    config = LongformerStyleConfig(
        vocab_size=SIZE.vocab, hidden_size=SIZE.hidden, num_hidden_layers=SIZE.layers,
        num_attention_heads=SIZE.heads, intermediate_size=SIZE.ff, attention_window=SIZE.window,
        attention_dilation=dilation, max_position_embeddings=seq_len + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, use_cache=False,
        max_global_tokens=SIZE.global_tokens if name == "ours-longformer-global" else None)
    model = _on_device(lambda: LongformerStyleForMaskedLM(config))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    extra = {}
    if name == "ours-longformer-global":
        mask = torch.zeros_like(ids)
        mask[:, :SIZE.global_tokens] = 1
        extra["global_attention_mask"] = mask
    return model, lambda: model(input_ids=ids, labels=labels, **extra).loss


def build_ours_linformer(name: str, seq_len: int):
    from subquadratic import LinformerConfig, LinformerForMaskedLM

    config = LinformerConfig(
        vocab_size=SIZE.vocab, hidden_size=SIZE.hidden, num_hidden_layers=SIZE.layers,
        num_attention_heads=SIZE.heads, intermediate_size=SIZE.ff, max_position_embeddings=seq_len,
        projected_length=min(SIZE.k, seq_len), parameter_sharing="headwise", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    model = _on_device(lambda: LinformerForMaskedLM(config))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    return model, lambda: model(input_ids=ids, labels=labels).loss


def build_hf_reformer(name: str, seq_len: int):
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        vocab_size=SIZE.vocab, hidden_size=SIZE.hidden, num_attention_heads=SIZE.heads,
        attention_head_size=SIZE.head_dim, attn_layers=attn_layers(), feed_forward_size=SIZE.ff,
        hidden_act="gelu", lsh_attn_chunk_length=SIZE.chunk, local_attn_chunk_length=SIZE.chunk,
        num_buckets=num_buckets(seq_len), num_hashes=SIZE.hashes, is_decoder=True, max_position_embeddings=seq_len,
        axial_pos_embds=True, axial_pos_shape=axial_shape(seq_len), axial_pos_embds_dim=axial_dims(),
        hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        use_cache=False, pad_token_id=0, eos_token_id=2)
    model = _on_device(lambda: ReformerModelWithLMHead(config))
    ids = _ids(seq_len)
    return model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss


def build_hf_longformer(name: str, seq_len: int):
    from transformers import LongformerConfig, LongformerForMaskedLM

    config = LongformerConfig(
        vocab_size=SIZE.vocab, hidden_size=SIZE.hidden, num_hidden_layers=SIZE.layers,
        num_attention_heads=SIZE.heads, intermediate_size=SIZE.ff, attention_window=SIZE.window,
        max_position_embeddings=seq_len + 2, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, type_vocab_size=1)
    model = _on_device(lambda: LongformerForMaskedLM(config))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    return model, lambda: model(input_ids=ids, labels=labels).loss


class Block(nn.Module):
    """Pre-LN Transformer block; `attend(q, k, v)` takes and returns (batch, heads, length, head_dim)."""

    def __init__(self, attend):
        super().__init__()
        inner = SIZE.heads * SIZE.head_dim
        self.attend = attend
        self.norm1 = nn.LayerNorm(SIZE.hidden)
        self.qkv = nn.Linear(SIZE.hidden, 3 * inner)
        self.out = nn.Linear(inner, SIZE.hidden)
        self.norm2 = nn.LayerNorm(SIZE.hidden)
        self.ff = nn.Sequential(nn.Linear(SIZE.hidden, SIZE.ff), nn.GELU(), nn.Linear(SIZE.ff, SIZE.hidden))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, SIZE.heads, SIZE.head_dim).permute(2, 0, 3, 1, 4)
        x = x + self.out(self.attend(q, k, v).transpose(1, 2).reshape(batch, length, -1))
        return x + self.ff(self.norm2(x))


class PlainTransformer(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LayerNorm, LM head."""

    def __init__(self, seq_len: int, attend):
        super().__init__()
        self.tokens = nn.Embedding(SIZE.vocab, SIZE.hidden)
        self.positions = nn.Embedding(seq_len, SIZE.hidden)
        self.blocks = nn.ModuleList(Block(attend) for _ in range(SIZE.layers))
        self.norm = nn.LayerNorm(SIZE.hidden)
        self.head = nn.Linear(SIZE.hidden, SIZE.vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_sdpa(name: str, seq_len: int):
    causal = name == "sdpa-full-causal"
    model = _on_device(lambda: PlainTransformer(
        seq_len, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
    ids = _ids(seq_len)
    if causal:
        return model, lambda: _lm_loss(model(ids), ids)
    labels = _mlm_labels(ids)
    return model, lambda: _mlm_loss(model(ids), labels)


class Unsupported(Exception):
    """A case this contender does not run; the message is the row's status."""


NEEDS_CUDA = "skipped (needs CUDA)"


_FLEX = {}  # the compiled flex_attention and the block masks, by (length, half window, device)


def _flex():
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for key in ("recompile_limit", "cache_size_limit"):  # one compilation per length, dtype and grad mode
            try:
                setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
            except AttributeError:
                pass
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def sliding_block_mask(seq_len: int):
    # Built with the package's eager builder, which gives the block mask create_block_mask gives (tested), without
    # compiling one for each length (that took minutes at 16K); the attention kernels are torch's either way.
    from subquadratic.modeling.attention.flex import build_block_mask

    half = SIZE.window // 2
    key = (seq_len, half, str(DEVICE))
    if key not in _FLEX:
        def sliding(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= half

        _FLEX[key] = build_block_mask(sliding, None, None, seq_len, seq_len, DEVICE, reach=(half, half))
    return _FLEX[key]


def build_flex(name: str, seq_len: int):
    if DEVICE.type != "cuda" and not FLEX_ON_CPU:
        raise Unsupported(NEEDS_CUDA)
    flex, block_mask = _flex(), sliding_block_mask(seq_len)

    def attend(q, k, v):
        # q, k, v come out of one Linear: bf16 under autocast, else fp32. The compiled kernel runs outside
        # autocast (pytorch#176025, #147551: flex_attention's backward under autocast can fail to compile or
        # fault) and on separate buffers (#157612: q, k, v sharing one buffer).
        with torch.autocast(DEVICE.type, enabled=False):
            return flex(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask)

    model = _on_device(lambda: PlainTransformer(seq_len, attend))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    return model, lambda: _mlm_loss(model(ids), labels)


def build_pkg_reformer(name: str, seq_len: int):
    from reformer_pytorch import ReformerLM  # reformer-pytorch 1.4.4

    model = _on_device(lambda: ReformerLM(
        num_tokens=SIZE.vocab, dim=SIZE.hidden, depth=SIZE.layers, max_seq_len=seq_len, heads=SIZE.heads,
        dim_head=SIZE.head_dim, bucket_size=SIZE.chunk, n_hashes=SIZE.hashes, ff_chunks=1, attn_chunks=1,
        causal=True, lsh_dropout=0.0, ff_dropout=0.0, ff_mult=SIZE.ff // SIZE.hidden, post_attn_dropout=0.0,
        layer_dropout=0.0, axial_position_emb=True, axial_position_shape=tuple(axial_shape(seq_len))))
    ids = _ids(seq_len)
    return model, lambda: _lm_loss(model(ids), ids)


def build_pkg_linformer(name: str, seq_len: int):
    from linformer import LinformerLM  # linformer 0.2.3

    model = _on_device(lambda: LinformerLM(
        num_tokens=SIZE.vocab, dim=SIZE.hidden, seq_len=seq_len, depth=SIZE.layers, k=min(SIZE.k, seq_len),
        heads=SIZE.heads, dim_head=SIZE.head_dim, dropout=0.0))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    return model, lambda: _mlm_loss(model(ids), labels)


def build_pkg_local_attention(name: str, seq_len: int):
    from local_attention import LocalTransformer  # local-attention 1.11.2

    model = _on_device(lambda: LocalTransformer(
        num_tokens=SIZE.vocab, max_seq_len=seq_len, dim=SIZE.hidden, depth=SIZE.layers, causal=False,
        local_attn_window_size=SIZE.window // 2, dim_head=SIZE.head_dim, heads=SIZE.heads,
        ff_mult=SIZE.ff / SIZE.hidden, attn_dropout=0.0, ff_dropout=0.0, num_residual_streams=1,
        look_backward=1, look_forward=1, exact_windowsize=True))
    ids = _ids(seq_len)
    labels = _mlm_labels(ids)
    return model, lambda: _mlm_loss(model(ids), labels)


CONTENDERS = {
    "ours-reformer": build_ours_reformer,
    "ours-longformer": build_ours_longformer,
    "ours-longformer-global": build_ours_longformer,
    "ours-longformer-dilated": build_ours_longformer,
    "ours-linformer": build_ours_linformer,
    "ours-reformer-readable": build_ours_reformer,
    "ours-longformer-readable": build_ours_longformer,
    "ours-linformer-readable": build_ours_linformer,
    "hf-reformer": build_hf_reformer,
    "hf-longformer": build_hf_longformer,
    "sdpa-full": build_sdpa,
    "sdpa-full-causal": build_sdpa,
    "flex-sliding": build_flex,
    "pkg-reformer-pytorch": build_pkg_reformer,
    "pkg-linformer": build_pkg_linformer,
    "pkg-local-attention": build_pkg_local_attention,
}
PACKAGES = {"pkg-reformer-pytorch": "reformer_pytorch", "pkg-linformer": "linformer",
            "pkg-local-attention": "local_attention"}
DISTRIBUTIONS = ("transformers", "reformer-pytorch", "linformer", "local-attention", "einops", "hyper-connections",
                 "axial-positional-embedding", "product-key-memory")
_LONGFORMER = {"hf": "hf-longformer", "pkg": "pkg-local-attention", "sdpa": "sdpa-full", "flex": "flex-sliding"}
COMPARE = {  # ours -> {column: contender}
    "ours-reformer": {"hf": "hf-reformer", "pkg": "pkg-reformer-pytorch", "sdpa": "sdpa-full-causal",
                      "flex": "flex-sliding"},
    "ours-longformer": _LONGFORMER,
    "ours-longformer-global": _LONGFORMER,
    "ours-longformer-dilated": _LONGFORMER,
    "ours-linformer": {"pkg": "pkg-linformer", "sdpa": "sdpa-full", "flex": "flex-sliding"},
}
COLUMNS = ("hf", "pkg", "sdpa", "flex")
# Contenders that run ours with the attention paths forced (`flex.set_fast_paths` for the whole case, since the
# Reformer's reversible backward runs the forward again): their readable paths.
FORCED_PATHS = {"ours-reformer-readable": False, "ours-linformer-readable": False, "ours-longformer-readable": False}
GRAPH = "+graph"  # suffix: the contender's training step recorded as a CUDA graph


def base_name(name: str) -> str:
    return name.removesuffix(GRAPH)


def contender_names() -> list[str]:
    return [*CONTENDERS, *(name + GRAPH for name in CONTENDERS)]


def measured_comparisons(rows: list[dict]) -> dict[str, dict[str, str]]:
    """`comparisons` of the contenders that measured a speed in ``rows``."""
    return comparisons({r["contender"] for r in rows if r["tokens_per_s"]})


def comparisons(measured) -> dict[str, dict[str, str]]:
    """ours -> {column: contender} for every one of ours in ``measured`` (contender names): COMPARE, and for a
    graphed one of ours each column's graphed contender where that was measured, else the eager one."""
    out = {}
    for name in measured:
        versus = COMPARE.get(base_name(name))
        if versus is None:
            continue
        if name.endswith(GRAPH):
            versus = {c: other + GRAPH if other + GRAPH in measured else other for c, other in versus.items()}
        out[name] = versus
    return out


def _order(name: str) -> float:
    names = list(CONTENDERS)
    base = base_name(name)
    return (names.index(base) if base in names else len(names)) + (0.5 if name.endswith(GRAPH) else 0)


# ---------------------------------------------------------------------------------------------------- running


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _device_broken() -> bool:
    """After an error: True if the CUDA context is unusable (illegal address, device assert), so nothing more runs."""
    if DEVICE.type != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=DEVICE).add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def run_case(name: str, length: int, dtype: str, mode: str, warmup: int, repeats: int, limit: float) -> dict:
    """Builds the model and times it; raises on errors (OOM included). Keeps no tensor alive after it returns."""
    cuda = DEVICE.type == "cuda"
    train = mode == "train"
    start = time.perf_counter()
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from subquadratic.modeling.attention.flex import set_fast_paths

    graphed, name = name.endswith(GRAPH), base_name(name)
    if graphed and (not cuda or not train):
        raise Unsupported(NEEDS_CUDA if not cuda else "skipped (graphs: train only)")
    set_fast_paths(FORCED_PATHS.get(name))  # None: each mechanism's own default
    model, loss_fn = CONTENDERS[name](name, length)
    model.train(train)
    parameters = sum(p.numel() for p in model.parameters())
    captured = []

    def step() -> float:
        if graphed:
            if not captured:  # the first step records (after one eager warm-up step)
                from subquadratic.training.cuda_graph import CapturedTrainingStep

                captured.append(CapturedTrainingStep(
                    model, {}, compute_loss=lambda m, b: loss_fn(), warmup_steps=1,
                    autocast_dtype=torch.bfloat16 if dtype == "bf16" else None))
            model.zero_grad(set_to_none=False)
            return captured[0]()
        if train:
            model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.set_grad_enabled(train):
            loss = loss_fn()
        if train:
            loss.backward()
        return loss.detach()

    _sync()
    t0 = time.perf_counter()
    loss = float(step())  # float() synchronises
    _sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        if time.perf_counter() - start > limit:
            break
        step()
    _sync()
    times: list[float] = []
    for _ in range(repeats):
        if times and time.perf_counter() - start + times[-1] > limit:
            break
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    row = dict(status="ok" if len(times) == repeats else f"ok ({len(times)}/{repeats} repeats)",
               tokens_per_s=SIZE.batch * length / median, median_s=median, times_s=times, first_step_s=first,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, parameters=parameters,
               first_loss=loss, repeats=len(times), slow=len(times) < repeats or time.perf_counter() - start > limit)
    return row  # the model, its inputs and graph die with this frame


def case_order(contenders, lengths, dtypes, modes) -> list[tuple[str, int, str, str]]:
    ordered = sorted(x for x in lengths if x >= BIG) + sorted((x for x in lengths if x < BIG), reverse=True)
    combos = [(d, m) for m in MODES for d in DTYPES if d in dtypes and m in modes]  # bf16 train, fp32 train, ...
    return [(c, n, d, m) for d, m in combos for n in ordered for c in contenders]


def _costlier_or_equal(dtype: str, mode: str, than_dtype: str, than_mode: str) -> bool:
    return DTYPES.index(dtype) >= DTYPES.index(than_dtype) and MODES.index(mode) <= MODES.index(than_mode)


class Interrupted(BaseException):  # SIGTERM (e.g. `timeout`): stop, report what ran
    pass


_SIGNAL = {"stop": False, "in_case": False}


def _on_sigterm(signum, frame):
    """Stops the run: a case in progress is abandoned, no new one starts, the report is still printed."""
    _SIGNAL["stop"] = True
    if _SIGNAL["in_case"]:
        _SIGNAL["in_case"] = False
        raise Interrupted


def run_all(args, environment: dict) -> list[dict]:
    cases = case_order(args.contenders, args.lengths, args.dtypes, args.modes)
    rows: list[dict] = []
    slow: list[tuple[str, int, str, str]] = []  # (contender, length, dtype, mode) that ran out of time
    oom: dict[tuple[str, str, str], int] = {}  # (contender, dtype, mode) -> shortest OOM length
    missing: dict[str, str] = {}
    broken = None  # the case after which the CUDA context died
    for i, (name, length, dtype, mode) in enumerate(cases):
        row = dict(contender=name, length=length, dtype=dtype, mode=mode, status=None, tokens_per_s=None,
                   median_s=None, times_s=[], first_step_s=None, peak_gib=None, parameters=None, first_loss=None,
                   repeats=0)
        elapsed = time.perf_counter() - T0
        package = PACKAGES.get(base_name(name))
        if _SIGNAL["stop"]:
            row["status"] = "not run (interrupted)"
        elif broken:
            row["status"] = f"not run (CUDA context broken by {broken})"
        elif elapsed > args.budget_seconds:
            row["status"] = "not run (budget)"
        elif package and (missing.get(package) or _missing(package)):
            missing[package] = "missing"
            row["status"] = "skipped (not installed)"
        elif (shortest := oom.get((name, dtype, mode))) is not None and length > shortest:
            row["status"] = "skipped (OOM at shorter)"
        elif any(n == name and (length > sl or (length == sl and (dtype, mode) != (sd, sm)))
                 and _costlier_or_equal(dtype, mode, sd, sm) for n, sl, sd, sm in slow):
            row["status"] = "skipped (slow)"
        else:
            limit = min(args.max_seconds_per_case, max(1.0, args.budget_seconds - elapsed))
            try:
                _SIGNAL["in_case"] = True
                row.update(run_case(name, length, dtype, mode, args.warmup, args.repeats, limit))
                _SIGNAL["in_case"] = False
                if row.pop("slow"):
                    slow.append((name, length, dtype, mode))
            except Unsupported as reason:
                row["status"] = str(reason)
            except Interrupted:
                row["status"] = "not run (interrupted)"
            except Exception as error:  # noqa: BLE001 -- every failure is a result here
                if _is_oom(error):
                    row["status"] = "OOM"
                    oom[name, dtype, mode] = min(length, oom.get((name, dtype, mode), length))
                else:
                    message = " ".join(str(error).split())[:120]
                    row["status"] = f"error: {type(error).__name__}: {message}"
                    if _device_broken():
                        broken = f"{name} {length} {dtype} {mode}"
                del error
            finally:
                _SIGNAL["in_case"] = False
            _free()
        rows.append(row)
        if not row["status"].startswith("not run"):
            print(f"[{i + 1}/{len(cases)} {time.perf_counter() - T0:.0f}s] {name} {length} {dtype} {mode}: "
                  f"{_short(row)}", flush=True)
        if args.json:
            _write_json(args.json, environment, rows)
    return rows


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _short(row: dict) -> str:
    if row["tokens_per_s"] is None:
        return row["status"]
    peak = "" if row["peak_gib"] is None else f", {row['peak_gib']:.2f} GiB"
    return f"{row['tokens_per_s']:,.0f} tok/s{peak}, first {row['first_step_s']:.2f}s, {row['status']}"


# -------------------------------------------------------------------------------------------------- reporting


def _lookup(rows: list[dict]) -> dict:
    return {(r["contender"], r["length"], r["dtype"], r["mode"]): r for r in rows}


def ratios(rows: list[dict]) -> list[dict]:
    table, out = _lookup(rows), []
    for ours, versus in measured_comparisons(rows).items():
        for (name, length, dtype, mode), row in table.items():
            if name != ours or not (row["tokens_per_s"] or row["status"] == "OOM"):
                continue
            entry = dict(model=ours, length=length, dtype=dtype, mode=mode, vs={})
            for column, other in versus.items():
                theirs = table.get((other, length, dtype, mode))
                if theirs is not None:
                    entry["vs"][column] = dict(contender=other, ratio=_ratio(row, theirs))
            out.append(entry)
    return out


def _ratio(ours: dict, theirs: dict) -> float | str | None:
    """ours / theirs tokens per second; "inf" when only theirs ran out of memory; None when unknown."""
    if ours["tokens_per_s"] and theirs["tokens_per_s"]:
        return ours["tokens_per_s"] / theirs["tokens_per_s"]
    if ours["tokens_per_s"] and theirs["status"] in ("OOM", "skipped (OOM at shorter)"):
        return "inf"
    return None


def crossovers(rows: list[dict], dtype: str = "bf16", mode: str = "train") -> dict:
    table, out = _lookup(rows), {}
    for ours, versus in measured_comparisons(rows).items():
        lengths = sorted(n for (c, n, d, m) in table if c == ours and d == dtype and m == mode)
        if not lengths:
            continue
        baseline, found, compared = versus["sdpa"], None, False
        for length in lengths:
            mine, theirs = table[ours, length, dtype, mode], table.get((baseline, length, dtype, mode))
            ratio = None if theirs is None else _ratio(mine, theirs)
            if ratio is None:
                continue
            compared = True
            if ratio == "inf" or ratio > 1:
                found = length
                break
        out[ours] = dict(vs=baseline, dtype=dtype, mode=mode, length=found, compared=compared,
                         max_length=max(lengths))
    return out


def _fmt_ratio(value) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "inf (OOM)"
    return f"{value:.2f}"


def growth_exponents(rows: list[dict], dtype: str = "bf16", mode: str = "train", low: int = 4096,
                     high: int = 65536) -> dict[str, dict]:
    """Per contender: the slope of log(peak memory) and of log(step time) against log(length), fitted by least
    squares over its measured lengths in [low, high] (1.0 = linear growth, 2.0 = quadratic); at least 2 lengths."""
    out = {}
    for name in dict.fromkeys(r["contender"] for r in rows):
        points = sorted((r["length"], r["peak_gib"], r["median_s"]) for r in rows
                        if r["contender"] == name and r["dtype"] == dtype and r["mode"] == mode
                        and low <= r["length"] <= high and r["tokens_per_s"])
        if len(points) < 2:
            continue
        xs = [math.log(n) for n, _, _ in points]
        out[name] = dict(lengths=[n for n, _, _ in points], memory=_slope(xs, [math.log(m) for _, m, _ in points]),
                         time=_slope(xs, [math.log(t) for _, _, t in points]))
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(rows: list[dict], path: str, dtype: str = "bf16", mode: str = "train") -> bool:
    """Tokens/s and peak memory against length (log-log), one line per contender; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    colors = plt.get_cmap("tab20").colors  # one color per contender (the default cycle repeats after 10)
    for i, name in enumerate(names):
        points = sorted((r["length"], r["tokens_per_s"], r["peak_gib"]) for r in rows
                        if r["contender"] == name and r["dtype"] == dtype and r["mode"] == mode and r["tokens_per_s"])
        if points:
            style = dict(linestyle="-" if name.startswith("ours") else "--", marker="os^vD"[i % 5],
                         color=colors[i % len(colors)], label=name)
            speed.plot([p[0] for p in points], [p[1] for p in points], **style)
            memory.plot([p[0] for p in points], [p[2] for p in points], **style)
    for ax, label in ((speed, "training tokens/s"), (memory, "peak memory (GiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{mode} step, {dtype}, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def report(rows: list[dict], environment: dict) -> str:
    env = environment
    lines = [f"## gpu_speed: {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | transformers "
             f"{env['transformers']} | {env['date']}",
             f"command: {env['command']}",
             f"shape: {env['shape']}; warm-up {env['warmup']}, median of {env['repeats']}; fp32 matmul precision "
             f"{env['float32_matmul_precision']}; packages: {env['packages']}",
             "", "| contender | tokens | dtype | mode | tok/s | peak GiB | first s | status |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    unmeasured: dict[str, dict[str, int]] = {}  # skipped or not run: status -> contender -> cases
    def key(r):
        return MODES.index(r["mode"]), DTYPES.index(r["dtype"]), _order(r["contender"]), r["length"]

    for r in sorted(rows, key=key):
        if r["status"].startswith(("not run", "skipped")):
            counts = unmeasured.setdefault(r["status"], {})
            counts[r["contender"]] = counts.get(r["contender"], 0) + 1
            continue
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        first = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.2f}"
        lines.append(f"| {r['contender']} | {r['length']} | {r['dtype']} | {r['mode']} | {tps} | {peak} | {first} "
                     f"| {r['status']} |")
    for status, counts in unmeasured.items():
        lines.append(f"{status}: " + ", ".join(f"{c} ({n})" for c, n in counts.items()) + " cases (all in --json)")
    entries = [e for e in ratios(rows) if e["dtype"] == "bf16" and e["mode"] == "train" and e["vs"]]
    if entries:
        lines += ["", "ratios, train bf16 (ours tok/s / theirs; inf: only theirs ran out of memory)", ""]
        for ours, versus in measured_comparisons(rows).items():
            if any(e["model"] == ours for e in entries):
                lines.append(f"- {ours}: " + ", ".join(f"{c} = {n}" for c, n in versus.items()))
        lines += ["", "| ours | tokens | " + " | ".join(f"vs {c}" for c in COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(COLUMNS)]
        for e in sorted(entries, key=lambda e: (_order(e["model"]), e["length"])):
            cells = [_fmt_ratio(e["vs"][c]["ratio"]) if c in e["vs"] else "" for c in COLUMNS]
            lines.append(f"| {e['model']} | {e['length']} | " + " | ".join(cells) + " |")
    cross = crossovers(rows)
    if cross:
        parts = []
        for ours, c in cross.items():
            if c["length"] is not None:
                parts.append(f"{ours} beats {c['vs']} from {c['length']}")
            elif c["compared"]:
                parts.append(f"{ours}: no crossover with {c['vs']} up to {c['max_length']}")
            else:
                parts.append(f"{ours}: {c['vs']} not measured")
        lines += ["", "crossover (train bf16): " + "; ".join(parts)]
    growth = growth_exponents(rows)
    if growth:
        lines += ["", "growth exponents, train bf16 (slope of log y against log length; 1 = linear):"]
        lines += [f"- {name}: memory {g['memory']:.2f}, step time {g['time']:.2f} (lengths {', '.join(map(str, g['lengths']))})"
                  for name, g in growth.items()]
    return "\n".join(lines)


def environment(args) -> dict:
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    cuda = DEVICE.type == "cuda"
    return dict(
        device=torch.cuda.get_device_name(DEVICE) if cuda else "CPU",
        torch=torch.__version__, cuda=torch.version.cuda, transformers=versions.pop("transformers"),
        packages=", ".join(f"{k} {v}" for k, v in versions.items() if v) or "none of the pkg-* packages",
        package_versions=versions, python=sys.version.split()[0],
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        shape=(f"{SIZE.layers} layers, hidden {SIZE.hidden}, {SIZE.heads} heads of {SIZE.head_dim}, feed-forward "
               f"{SIZE.ff}, vocabulary {SIZE.vocab}, batch {SIZE.batch}, window {SIZE.window}, chunk {SIZE.chunk}, "
               f"{SIZE.hashes} hashes, k {SIZE.k}"),
        size=asdict(SIZE), warmup=args.warmup, repeats=args.repeats, budget_seconds=args.budget_seconds,
        max_seconds_per_case=args.max_seconds_per_case, quick=args.quick,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        alloc_conf=os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), torch_threads=torch.get_num_threads())


def _write_json(path: str, env: dict, rows: list[dict]) -> None:
    data = dict(environment=env, rows=rows, ratios=ratios(rows), crossover=crossovers(rows))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(target)


def _warm_device() -> None:
    """Creates the CUDA context and cuBLAS handles so the first contender's first step does not pay for them."""
    x = torch.randn(256, 256, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = F.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])
    (x @ x).sum().add(y.float().sum()).backward()
    _sync()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="+", choices=contender_names(), default=list(CONTENDERS),
                        metavar="NAME", help="contenders (default: all, eager); NAME+graph: recorded as a CUDA graph")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384 65536; "
                        "--quick: 256 512); multiples of 128")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup", type=int, help="untimed steps, the first reported as first-step time "
                        "(default 2; --quick: 1)")
    parser.add_argument("--repeats", type=int, help="timed steps; the median is reported (default 5; --quick: 1)")
    parser.add_argument("--max-seconds-per-case", type=float, default=60.0,
                        help="stop timing a case past this; longer lengths of it are then skipped (default 60)")
    parser.add_argument("--budget-seconds", type=float, default=540.0,
                        help="no case starts after this many seconds (default 540)")
    parser.add_argument("--json", help="write every row, the ratios and the environment here (after every case)")
    parser.add_argument("--markdown", help="also write the final report here")
    parser.add_argument("--plot", help="also draw tokens/s and peak memory against length (train bf16) to this PNG")
    parser.add_argument("--report-from", metavar="JSON", help="no run: print the report (and --plot) of a saved --json")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (2 layers, hidden 64, lengths 256 512, 1 repeat), runs on CPU: a smoke test")
    parser.add_argument("--flex-on-cpu", action="store_true", help="run flex-sliding on CPU too (compiles: slow)")
    args = parser.parse_args(argv)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    args.contenders = list(dict.fromkeys(args.contenders))
    return args


def main(argv=None) -> int:
    global SIZE, DEVICE, FLEX_ON_CPU
    args = parse_args(argv)
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        print(report(saved["rows"], saved["environment"]))
        if args.plot:
            plot(saved["rows"], args.plot)
        return 0
    if not torch.cuda.is_available() and not args.quick:
        print("gpu_speed: no CUDA GPU here, nothing to measure (exit 0); --quick runs a tiny CPU smoke test.")
        return 0
    SIZE = QUICK if args.quick else FULL
    DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    FLEX_ON_CPU = args.flex_on_cpu
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGTERM, _on_sigterm)
    env = environment(args)
    _warm_device()
    rows = run_all(args, env)
    text = report(rows, env)
    if args.json:
        _write_json(args.json, env, rows)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot(rows, args.plot)
    print("\n" + text, flush=True)
    return 128 + signal.SIGTERM if _SIGNAL["stop"] else 0


if __name__ == "__main__":
    sys.exit(main())
