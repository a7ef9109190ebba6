"""Configuration of Reformer-LM (Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer")."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .validation import non_negative_int, one_of, positive_int, probability, require

ATTENTION_KINDS = ("lsh", "local")


class ReformerLMConfig(PretrainedConfig):
    r"""Configuration of a Reformer-LM: reversible layers that alternate LSH and local (chunked) self-attention.

    Args:
        vocab_size (`int`, defaults to 256): tokens in the vocabulary (256 = raw bytes).
        hidden_size (`int`, defaults to 256): width of the residual stream (each of the two reversible streams).
        num_attention_heads (`int`, defaults to 4): attention heads per layer.
        attention_head_size (`int`, defaults to 64): width of one head; heads * head size need not equal hidden size.
        attn_layers (`list[str]`, optional): the attention of each layer, `"lsh"` or `"local"`; its length is the
            number of layers. Defaults to `["local", "lsh"]` repeated to `num_hidden_layers`.
        num_hidden_layers (`int`, optional): number of layers; only needed when `attn_layers` is not given
            (if both are given they must agree). Defaults to 4.
        lsh_chunk_length (`int`, defaults to 64): length of the chunks of the hash-sorted sequence; each chunk
            attends to itself and the chunk before it.
        num_buckets (`int`, `list[int]` or None, defaults to None): hash buckets per round. An even number; or a pair
            `[b1, b2]` of even numbers for factorised buckets (b1 * b2 buckets from two smaller rotations); or 1 (every
            token in one bucket: exact attention within chunks, useful for tests); or None to choose the paper's
            rule from the sequence length the model is built for: the power of two nearest to
            `2 * max_position_embeddings / lsh_chunk_length` (at least 2).
        num_hashes (`int`, defaults to 1): hashing rounds; their outputs are combined by their log-sum-exp weights.
        hash_seed (`int` or None, defaults to None): seed of the random rotations. With a seed, every forward pass
            uses the same rotations. Without one, training draws fresh rotations each forward pass (as in the paper)
            and evaluation (`model.eval()`) uses fixed rotations drawn from seed 0, so evaluation and cached
            generation are deterministic.
        local_chunk_length (`int`, defaults to 64): chunk length of local attention.
        local_num_chunks_before (`int`, defaults to 1): chunks before its own that a local chunk attends to.
        local_num_chunks_after (`int`, defaults to 0): chunks after its own that a local chunk attends to
            (has no effect when causal).
        is_decoder (`bool`, defaults to True): causal (autoregressive) attention. `...ForCausalLM` needs True,
            `...ForMaskedLM` needs False.
        intermediate_size (`int`, defaults to 512): inner width of the feed-forward layers.
        chunk_size_feed_forward (`int`, defaults to 0): the feed-forward layers process this many positions at a
            time to bound their activation memory; 0 processes the whole sequence at once.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward activation, any name of `transformers.activations`.
        max_position_embeddings (`int`, optional): the longest sequence the model takes. Defaults to the product of
            `axial_pos_shape` (or 4096 without axial embeddings). Shorter inputs of any length work: the model pads
            them to whole chunks internally and strips the padding from its outputs.
        axial_pos_embds (`bool`, defaults to True): factorised (axial) position embeddings instead of one learned
            vector per position.
        axial_pos_shape (`list[int]`, defaults to `[64, 64]`): factors of the axial position grid; their product must
            be at least `max_position_embeddings`. Position p has coordinates p in mixed radix of this shape.
        axial_pos_embds_dim (`list[int]`, defaults to `[64, 192]`): width of each axis' embedding; they are
            concatenated, so they must sum to `hidden_size`.
        hidden_dropout_prob (`float`, defaults to 0.05): dropout after embeddings, attention and feed-forward outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.05): dropout on attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-12): epsilon of the layer norms.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight initialisation.
        reversible (`bool`, defaults to True): run the layers as reversible residual blocks, recomputing activations
            in the backward pass so activation memory does not grow with depth. False runs the same blocks as
            ordinary residual layers (same outputs, more memory, and activation checkpointing applies).
        tie_word_embeddings (`bool`, defaults to False): share the input embedding matrix with the LM head.
        use_cache (`bool`, defaults to True): return a cache for incremental decoding (causal models, eval mode).
        classifier_dropout (`float`, optional): dropout before the classification head; defaults to
            `hidden_dropout_prob`.
    """

    model_type = "reformer_lm"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 256,
        num_attention_heads: int = 4,
        attention_head_size: int = 64,
        attn_layers: list[str] | None = None,
        num_hidden_layers: int | None = None,
        lsh_chunk_length: int = 64,
        num_buckets: int | list[int] | None = None,
        num_hashes: int = 1,
        hash_seed: int | None = None,
        local_chunk_length: int = 64,
        local_num_chunks_before: int = 1,
        local_num_chunks_after: int = 0,
        is_decoder: bool = True,
        intermediate_size: int = 512,
        chunk_size_feed_forward: int = 0,
        hidden_act: str = "gelu",
        max_position_embeddings: int | None = None,
        axial_pos_embds: bool = True,
        axial_pos_shape: list[int] = (64, 64),
        axial_pos_embds_dim: list[int] = (64, 192),
        hidden_dropout_prob: float = 0.05,
        attention_probs_dropout_prob: float = 0.05,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        reversible: bool = True,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        classifier_dropout: float | None = None,
        **kwargs,
    ):
        if attn_layers is None:
            layers = 4 if num_hidden_layers is None else num_hidden_layers
            positive_int("num_hidden_layers", layers)
            attn_layers = [ATTENTION_KINDS[(i + 1) % 2] for i in range(layers)]
        attn_layers = list(attn_layers)
        require(len(attn_layers) > 0, "attn_layers", attn_layers, "expected at least one layer")
        for i, kind in enumerate(attn_layers):
            one_of(f"attn_layers[{i}]", kind, ATTENTION_KINDS)
        if num_hidden_layers is not None:
            require(num_hidden_layers == len(attn_layers), "num_hidden_layers", num_hidden_layers,
                    f"must equal len(attn_layers)={len(attn_layers)} when both are given")
        for name, value in [("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_attention_heads", num_attention_heads), ("attention_head_size", attention_head_size),
                            ("lsh_chunk_length", lsh_chunk_length), ("num_hashes", num_hashes),
                            ("local_chunk_length", local_chunk_length), ("intermediate_size", intermediate_size)]:
            positive_int(name, value)
        non_negative_int("local_num_chunks_before", local_num_chunks_before)
        non_negative_int("local_num_chunks_after", local_num_chunks_after)
        non_negative_int("chunk_size_feed_forward", chunk_size_feed_forward)
        for name, value in [("hidden_dropout_prob", hidden_dropout_prob),
                            ("attention_probs_dropout_prob", attention_probs_dropout_prob)]:
            probability(name, value)
        if classifier_dropout is not None:
            probability("classifier_dropout", classifier_dropout)
        require(hash_seed is None or isinstance(hash_seed, int), "hash_seed", hash_seed, "expected an integer or None")

        axial_pos_shape, axial_pos_embds_dim = list(axial_pos_shape), list(axial_pos_embds_dim)
        if axial_pos_embds:
            require(len(axial_pos_shape) >= 1 and all(isinstance(a, int) and a > 0 for a in axial_pos_shape),
                    "axial_pos_shape", axial_pos_shape, "expected a list of positive integers")
            require(len(axial_pos_embds_dim) == len(axial_pos_shape), "axial_pos_embds_dim", axial_pos_embds_dim,
                    f"expected one width per axis of axial_pos_shape={axial_pos_shape}")
            require(sum(axial_pos_embds_dim) == hidden_size, "axial_pos_embds_dim", axial_pos_embds_dim,
                    f"the widths are concatenated, so they must sum to hidden_size={hidden_size}")
            grid = math.prod(axial_pos_shape)
            if max_position_embeddings is None:
                max_position_embeddings = grid
            require(max_position_embeddings <= grid, "max_position_embeddings", max_position_embeddings,
                    f"axial_pos_shape={axial_pos_shape} only has {grid} positions")
        elif max_position_embeddings is None:
            max_position_embeddings = 4096
        positive_int("max_position_embeddings", max_position_embeddings)

        if isinstance(num_buckets, (list, tuple)):
            num_buckets = list(num_buckets)
            require(len(num_buckets) == 2 and all(isinstance(b, int) and b >= 2 and b % 2 == 0 for b in num_buckets),
                    "num_buckets", num_buckets, "a factorised pair must be two even integers >= 2, e.g. [32, 64]")
        elif num_buckets is not None:
            require(isinstance(num_buckets, int) and (num_buckets == 1 or (num_buckets >= 2 and num_buckets % 2 == 0)),
                    "num_buckets", num_buckets, "expected an even integer >= 2, 1, a pair of even integers, or None")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = attention_head_size
        self.attn_layers = attn_layers
        self.num_hidden_layers = len(attn_layers)
        self.lsh_chunk_length = lsh_chunk_length
        self.num_buckets = num_buckets
        self.num_hashes = num_hashes
        self.hash_seed = hash_seed
        self.local_chunk_length = local_chunk_length
        self.local_num_chunks_before = local_num_chunks_before
        self.local_num_chunks_after = local_num_chunks_after
        self.is_decoder = is_decoder
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.axial_pos_embds = axial_pos_embds
        self.axial_pos_shape = axial_pos_shape
        self.axial_pos_embds_dim = axial_pos_embds_dim
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.reversible = reversible
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.classifier_dropout = classifier_dropout
        super().__init__(chunk_size_feed_forward=chunk_size_feed_forward, **kwargs)
        self.chunk_size_feed_forward = chunk_size_feed_forward

    @property
    def resolved_num_buckets(self) -> int | list[int]:
        """`num_buckets`, with None replaced by the paper's rule for `max_position_embeddings`."""
        if self.num_buckets is not None:
            return self.num_buckets
        target = max(2.0, 2.0 * self.max_position_embeddings / self.lsh_chunk_length)
        return 2 ** max(1, round(math.log2(target)))
