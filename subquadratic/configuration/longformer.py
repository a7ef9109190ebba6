"""Configuration of the Longformer-style encoder (Beltagy, Peters, Cohan 2020, "Longformer: The Long-Document
Transformer")."""

from __future__ import annotations

from transformers import PretrainedConfig

from .validation import non_negative_int, one_of, per_layer, positive_int, probability, require

GLOBAL_ATTENTION_DEFAULTS = ("none", "first_token")


def _even_window(field: str, value) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value % 2 == 0, field, value,
            "expected an even integer >= 2 (the window covers value / 2 tokens on each side, or value tokens before "
            "when causal)")


def _dilations(field: str, value, num_heads: int) -> list[int]:
    """One layer's dilation: one value for every head, or a list with one per head."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_heads
    require(len(values) == num_heads, field, value,
            f"expected one value or a list of {num_heads} (one per attention head)")
    for i, v in enumerate(values):
        positive_int(f"{field}[{i}]", v)
    return values


class LongformerStyleConfig(PretrainedConfig):
    r"""Configuration of a Longformer-style Transformer: RoBERTa's post-LayerNorm layers with sliding-window,
    dilated and global self-attention instead of full attention. The weights have the layout of RoBERTa and of
    `transformers`' `LongformerModel` (learned absolute positions offset by the padding index, token type
    embeddings), so their checkpoints convert (`subquadratic.convert.longformer`). Defaults are those of
    `allenai/longformer-base-4096`.

    Args:
        vocab_size (`int`, defaults to 50265): tokens in the vocabulary.
        hidden_size (`int`, defaults to 768): width of the residual stream; a multiple of `num_attention_heads`.
        num_hidden_layers (`int`, defaults to 12): number of layers.
        num_attention_heads (`int`, defaults to 12): attention heads per layer (head size is
            `hidden_size / num_attention_heads`).
        intermediate_size (`int`, defaults to 3072): inner width of the feed-forward layers.
        attention_window (`int` or `list[int]`, defaults to 512): window size w of each layer; one value for every
            layer or a list with one per layer. An even number: a bidirectional token attends to w / 2 tokens on
            each side of it (and itself); a causal one to the w tokens before it (and itself).
        attention_dilation (`int`, `list[int]` or `list[int | list[int]]`, defaults to 1): gap d between the
            tokens a window covers (token i attends to i + k * d), so the window reaches w * d tokens with the same
            cost. One value for every layer and head; or a list with one entry per layer, each one value for every
            head of that layer or a list with one per head (the paper gives different heads different dilations).
            1 is plain sliding-window attention.
        default_global_attention (`str`, defaults to `"none"`): which tokens get global attention when a call passes
            no `global_attention_mask`: `"none"`, or `"first_token"` (the first position, e.g. `<s>`). Global
            tokens attend to every token and every token attends to them (in causal models: every earlier token,
            and every later token attends to them), with their own query/key/value projections. Per call, pass
            `global_attention_mask` (batch, length), 1 for global tokens. `...ForSequenceClassification` defaults to
            the first token and `...ForQuestionAnswering` to the question (tokens before the first `sep_token_id`).
        max_global_tokens (`int`, optional): the most global tokens a row of a batch has. None: the tensors of the
            global tokens are sized by the largest count in the batch, read back from the GPU at each forward
            pass. A number: they are sized by it, so a training step with global tokens can be recorded as a CUDA
            graph (`subquadratic.training.cuda_graph`), where nothing may be read back. A row with more is an
            error: a `ValueError` in eager calls (which still read the count back to check it) and from
            `CapturedTrainingStep` before a replay; a device-side assertion inside a graph recorded otherwise.
        is_decoder (`bool`, defaults to False): causal (autoregressive) attention. `...ForCausalLM` needs True,
            `...ForMaskedLM` needs False.
        max_position_embeddings (`int`, defaults to 4098): rows of the position embedding table. As in RoBERTa,
            position ids start at `pad_token_id + 1` (padding tokens get `pad_token_id`), so the longest input is
            `max_position_embeddings - pad_token_id - 1` tokens (4096 with the defaults). Any shorter length works:
            attention pads internally to whole windows and strips the padding.
        type_vocab_size (`int`, defaults to 1): token types (`token_type_ids`); RoBERTa and Longformer use 1.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward and MLM-head activation, any name of
            `transformers.activations`.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on embeddings and sub-layer outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the layer norms.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight initialisation.
        chunk_size_feed_forward (`int`, defaults to 0): the feed-forward layers process this many positions at a
            time to bound their activation memory; 0 processes the whole sequence at once.
        pad_token_id (`int`, defaults to 1), bos_token_id (`int`, defaults to 0), eos_token_id (`int`, defaults to 2),
            sep_token_id (`int`, defaults to 2): RoBERTa's special tokens. `pad_token_id` is also the padding index
            of the position embeddings; `sep_token_id` ends the question for `...ForQuestionAnswering`.
        use_cache (`bool`, defaults to True): return a cache for incremental decoding (causal models, eval mode).
        tie_word_embeddings (`bool`, defaults to True): share the input embedding matrix with the LM head.
        classifier_dropout (`float`, optional): dropout in the classification heads; defaults to
            `hidden_dropout_prob`.
    """

    model_type = "longformer_style"

    def __init__(
        self,
        vocab_size: int = 50265,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        attention_window: int | list[int] = 512,
        attention_dilation: int | list[int | list[int]] = 1,
        default_global_attention: str = "none",
        max_global_tokens: int | None = None,
        is_decoder: bool = False,
        max_position_embeddings: int = 4098,
        type_vocab_size: int = 1,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        chunk_size_feed_forward: int = 0,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        sep_token_id: int = 2,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        classifier_dropout: float | None = None,
        **kwargs,
    ):
        for name, value in [("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads),
                            ("intermediate_size", intermediate_size), ("type_vocab_size", type_vocab_size)]:
            positive_int(name, value)
        require(hidden_size % num_attention_heads == 0, "hidden_size", hidden_size,
                f"must be a multiple of num_attention_heads={num_attention_heads}")
        attention_window = per_layer("attention_window", attention_window, num_hidden_layers, _even_window)
        # Per layer, then per head: a flat list of ints is one value per layer (checked against the layer count).
        layer_dilations = per_layer("attention_dilation", attention_dilation, num_hidden_layers, lambda f, v: None)
        attention_dilation = [_dilations(f"attention_dilation[{i}]", d, num_attention_heads)
                              for i, d in enumerate(layer_dilations)]
        one_of("default_global_attention", default_global_attention, GLOBAL_ATTENTION_DEFAULTS)
        if max_global_tokens is not None:
            positive_int("max_global_tokens", max_global_tokens)
        non_negative_int("pad_token_id", pad_token_id)
        require(isinstance(sep_token_id, int) and sep_token_id >= 0, "sep_token_id", sep_token_id,
                "expected a token id (an integer >= 0)")
        positive_int("max_position_embeddings", max_position_embeddings)
        require(max_position_embeddings > pad_token_id + 1, "max_position_embeddings", max_position_embeddings,
                f"positions start at pad_token_id + 1 = {pad_token_id + 1}, so it must be larger than that")
        non_negative_int("chunk_size_feed_forward", chunk_size_feed_forward)
        for name, value in [("hidden_dropout_prob", hidden_dropout_prob),
                            ("attention_probs_dropout_prob", attention_probs_dropout_prob)]:
            probability(name, value)
        if classifier_dropout is not None:
            probability("classifier_dropout", classifier_dropout)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.attention_window = attention_window
        self.attention_dilation = attention_dilation
        self.default_global_attention = default_global_attention
        self.max_global_tokens = max_global_tokens
        self.is_decoder = is_decoder
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.classifier_dropout = classifier_dropout
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         sep_token_id=sep_token_id, chunk_size_feed_forward=chunk_size_feed_forward, **kwargs)
        self.chunk_size_feed_forward = chunk_size_feed_forward

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table covers (positions start at `pad_token_id + 1`)."""
        return self.max_position_embeddings - self.pad_token_id - 1
