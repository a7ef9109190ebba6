"""Configuration of the Linformer encoder (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity")."""

from __future__ import annotations

from transformers import PretrainedConfig

from .validation import non_negative_int, one_of, per_layer, positive_int, probability, require

SHARING_MODES = ("none", "headwise", "key-value", "layerwise")
PROJECTION_KINDS = ("linear", "mean", "max", "conv")


class LinformerConfig(PretrainedConfig):
    r"""Configuration of a Linformer encoder: BERT-style post-LN layers whose self-attention projects keys and
    values along the sequence axis from `max_position_embeddings` (n) to `projected_length` (k) positions, so each
    layer costs O(n k) time and memory instead of O(n^2).

    Args:
        vocab_size (`int`, defaults to 30522): tokens in the vocabulary.
        hidden_size (`int`, defaults to 256): width of the residual stream; a multiple of `num_attention_heads`.
        num_hidden_layers (`int`, defaults to 4): number of encoder layers.
        num_attention_heads (`int`, defaults to 4): attention heads per layer (head size = hidden / heads).
        intermediate_size (`int`, defaults to 1024): inner width of the feed-forward layers.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward activation, any name of `transformers.activations`.
        max_position_embeddings (`int`, defaults to 4096): n, the longest sequence the model takes. The learned
            positions and the projections (E, F: k x n) are built for it. Shorter inputs work (E and F are sliced
            to their length); longer ones are refused.
        projected_length (`int` or `list[int]`, defaults to 256): k, the number of projected key/value positions:
            one value for every layer, or one per layer (the paper's layer-wise decreasing k). At most n; with a
            pooling or convolution `projection_kind`, a divisor of n.
        parameter_sharing (`str`, defaults to `"none"`): which projections are shared (paper, section 4):
            `"none"`: separate E and F for each head of each layer; `"headwise"`: one E and one F per layer, shared
            by its heads; `"key-value"`: one matrix per layer used as both E and F by all heads; `"layerwise"`: a
            single matrix for every layer, head, key and value (needs one `projected_length`).
        projection_kind (`str`, defaults to `"linear"`): how keys and values are shortened from n to k positions:
            `"linear"`: learned k x n matrices (the paper's method); `"mean"` or `"max"`: pooling with
            kernel = stride = n / k (no parameters); `"conv"`: a learned strided convolution with kernel =
            stride = n / k (one filter of n / k weights per shared projection, applied to every feature).
        hidden_dropout_prob (`float`, defaults to 0.1): dropout after embeddings, attention and feed-forward outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-12): epsilon of the layer norms.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight initialisation (the
            projections use 1 / sqrt(fan-in) instead, which keeps projected keys at the scale of single keys).
        chunk_size_feed_forward (`int`, defaults to 0): the feed-forward layers process this many positions at a
            time to bound their activation memory; 0 processes the whole sequence at once.
        pad_token_id (`int`, defaults to 0): id of the padding token (its embedding starts at zero).
        classifier_dropout (`float`, optional): dropout before the classification heads; defaults to
            `hidden_dropout_prob`.
        tie_word_embeddings (`bool`, defaults to True): share the input embedding matrix with the masked-LM decoder.
        is_decoder (`bool`, defaults to False): must stay False. Linformer attention is bidirectional: every
            projected position mixes the whole sequence, so a query cannot be kept from seeing later tokens.
    """

    model_type = "linformer_encoder"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        hidden_act: str = "gelu",
        max_position_embeddings: int = 4096,
        projected_length: int | list[int] = 256,
        parameter_sharing: str = "none",
        projection_kind: str = "linear",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        chunk_size_feed_forward: int = 0,
        pad_token_id: int | None = 0,
        classifier_dropout: float | None = None,
        tie_word_embeddings: bool = True,
        is_decoder: bool = False,
        **kwargs,
    ):
        require(not is_decoder, "is_decoder", is_decoder,
                "Linformer is bidirectional (each projected key mixes the whole sequence), so it cannot be causal")
        for name, value in [("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads),
                            ("intermediate_size", intermediate_size),
                            ("max_position_embeddings", max_position_embeddings)]:
            positive_int(name, value)
        require(hidden_size % num_attention_heads == 0, "hidden_size", hidden_size,
                f"must be a multiple of num_attention_heads={num_attention_heads}")
        one_of("parameter_sharing", parameter_sharing, SHARING_MODES)
        one_of("projection_kind", projection_kind, PROJECTION_KINDS)
        n = max_position_embeddings

        def check_k(field: str, k) -> None:
            positive_int(field, k)
            require(k <= n, field, k, f"the projected length k must be at most max_position_embeddings={n}")
            if projection_kind != "linear":
                require(n % k == 0, field, k, f"projection_kind={projection_kind!r} pools with kernel = stride = "
                        f"n / k, so k must divide max_position_embeddings={n}")

        lengths = per_layer("projected_length", projected_length, num_hidden_layers, check_k)
        if parameter_sharing == "layerwise":
            require(len(set(lengths)) == 1, "projected_length", projected_length,
                    "parameter_sharing='layerwise' uses one projection for every layer, so all layers need the same k")
        non_negative_int("chunk_size_feed_forward", chunk_size_feed_forward)
        for name, value in [("hidden_dropout_prob", hidden_dropout_prob),
                            ("attention_probs_dropout_prob", attention_probs_dropout_prob)]:
            probability(name, value)
        if classifier_dropout is not None:
            probability("classifier_dropout", classifier_dropout)
        if pad_token_id is not None:
            require(isinstance(pad_token_id, int) and 0 <= pad_token_id < vocab_size, "pad_token_id", pad_token_id,
                    f"expected None or an id in [0, vocab_size={vocab_size})")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.projected_length = list(projected_length) if isinstance(projected_length, (list, tuple)) else projected_length
        self.parameter_sharing = parameter_sharing
        self.projection_kind = projection_kind
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.classifier_dropout = classifier_dropout
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(pad_token_id=pad_token_id, is_decoder=False, chunk_size_feed_forward=chunk_size_feed_forward,
                         **kwargs)
        self.chunk_size_feed_forward = chunk_size_feed_forward

    @property
    def projected_lengths(self) -> list[int]:
        """k of each layer (`projected_length` expanded to one value per layer)."""
        k = self.projected_length
        return list(k) if isinstance(k, (list, tuple)) else [k] * self.num_hidden_layers

    @property
    def attention_head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads
