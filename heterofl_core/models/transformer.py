"""The WikiText2 Transformer (spec section 3): post-norm encoder, masked-token reconstruction."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..slicing import LABELS, PREFIX, Axes, Heads, default_axes, module_axes
from .layers import init_norms, make_scaler, width


class MultiheadAttention(nn.Module):
    """q, k, v = scaler(linear(x)) split into heads; softmax(QK^T / sqrt(head size)) V; no causal mask."""

    def __init__(self, embed: int, heads: int, scaler: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.scaler = scaler
        self.q, self.k, self.v, self.o = (nn.Linear(embed, embed) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, e = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return self.scaler(t).view(n, s, self.heads, e // self.heads).transpose(1, 2)  # (N, h, S, E/h)

        out = F.scaled_dot_product_attention(split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x)))
        return self.scaler(self.o(out.transpose(1, 2).reshape(n, s, e)))


class EncoderLayer(nn.Module):
    """x = LN1(x + Drop(MHA(x))); x = LN2(x + Drop(scaler(W2 Drop(GELU(scaler(W1 x))))))."""

    def __init__(self, embed: int, heads: int, hidden: int, dropout: float, scaler: nn.Module) -> None:
        super().__init__()
        self.attention = MultiheadAttention(embed, heads, scaler)
        self.norm1 = nn.LayerNorm(embed)
        self.linear1 = nn.Linear(embed, hidden)
        self.linear2 = nn.Linear(hidden, embed)
        self.norm2 = nn.LayerNorm(embed)
        self.dropout = nn.Dropout(dropout)
        self.scaler = scaler
        nn.init.normal_(self.linear1.weight, std=0.02)
        nn.init.normal_(self.linear2.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        ff = self.linear2(self.dropout(F.gelu(self.scaler(self.linear1(x)))))
        return self.norm2(x + self.dropout(self.scaler(ff)))


class Transformer(nn.Module):
    """Token + positional embedding, ``layers`` encoder layers, decoder to vocabulary logits.

    The embedding has ``vocab_size + 1`` rows: the last is the mask token
    (:func:`mask_tokens`). Widths: embedding ``embed * rate`` rounded up to a
    multiple of ``heads`` (a no-op for the paper's levels), feed-forward ``hidden * rate``.
    """

    def __init__(self, rate: float = 1.0, *, global_rate: float = 1.0, scale: bool = True, vocab_size: int = 33278,
                 embed: int = 256, heads: int = 8, hidden: int = 512, layers: int = 4, dropout: float = 0.2,
                 bptt: int = 64) -> None:
        super().__init__()
        e = heads * width(rate, embed // heads)
        scaler = make_scaler(scale, rate, global_rate)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size + 1, e)
        self.position_embedding = nn.Embedding(bptt, e)
        self.embed_norm = nn.LayerNorm(e)
        self.dropout = nn.Dropout(dropout)
        # As torch.nn.TransformerEncoder in the authors' code: copies of one layer, so all start equal.
        layer = EncoderLayer(e, heads, width(rate, hidden), dropout, scaler)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))
        self.decoder_linear = nn.Linear(e, e)
        self.decoder_norm = nn.LayerNorm(e)
        self.output = nn.Linear(e, vocab_size)
        self.scaler = scaler
        init_norms(self)

    @property
    def mask_token(self) -> int:
        return self.vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, S) token ids -> (N, S, vocab) logits."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.scaler(self.token_embedding(tokens)) + self.scaler(self.position_embedding(positions))
        x = self.dropout(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x)
        return self.output(self.decoder_norm(F.gelu(self.scaler(self.decoder_linear(x)))))

    def width_axes(self) -> dict[str, Axes]:
        """Slicing rules: q/k/v outputs and o's input per head; token rows by label; output keeps all tokens."""
        axes = {**default_axes(self),
                **module_axes(self, self.token_embedding, weight=(LABELS, PREFIX)),
                **module_axes(self, self.output, weight=(LABELS, PREFIX), bias=(LABELS,))}
        per_head = Heads(self.layers[0].attention.heads)
        for layer in self.layers:
            for proj in (layer.attention.q, layer.attention.k, layer.attention.v):
                axes.update(module_axes(self, proj, weight=(per_head, PREFIX), bias=(per_head,)))
            axes.update(module_axes(self, layer.attention.o, weight=(PREFIX, per_head)))
        return axes


def mask_tokens(tokens: torch.Tensor, mask_token: int, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each token by ``mask_token`` with probability ``rate`` (train and eval, spec section 3)."""
    hit = torch.rand(tokens.shape, generator=generator, device=tokens.device) < rate
    return tokens.masked_fill(hit, mask_token)
