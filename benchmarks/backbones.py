"""Published fusion backbones for the competition suite, as :class:`PaSEModel` subclasses.

Every backbone keeps the reference model's per-modality encoders, unimodal heads, losses and
decision (:meth:`PaSEModel.fuse` = decision rule on :meth:`PaSEModel.head_output`) and replaces
only the fusion head, :meth:`~PaSEModel.head_output`, so every balancing method of the suite runs
on it unchanged. The fusion must be a pure function of ``(feats, present)``: the Shapley game calls
it with detached features and other coalitions expressed through ``present``, so an absent
modality (``present[m]`` False for a sample) must not influence that sample's output at all.

* ``late`` (``None`` in :data:`BACKBONES`): the reference :class:`PaSEModel` itself (mean of the
  present modalities' features, MLP head);
* ``tfn``: Tensor Fusion Network (Zadeh et al., EMNLP 2017), :class:`TFNModel`;
* ``lmf``: Low-rank Multimodal Fusion (Liu et al., ACL 2018), :class:`LMFModel`;
* ``mult``: cross-modal attention in the style of the Multimodal Transformer (Tsai et al., ACL
  2019), :class:`MulTModel`, on a few learned summary tokens per modality.

:func:`make_model` builds one by name from the suite's :class:`PaSEConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from examples.pase import MLPEncoder, PaSEConfig, PaSEModel

__all__ = [
    "BACKBONES",
    "CrossModalBlock",
    "LMFModel",
    "MulTModel",
    "TFNModel",
    "TokenEncoder",
    "make_model",
]


def _with_one(h: Tensor, present: Tensor) -> Tensor:
    """``[h; 1]``, or ``[0 ... 0; 1]`` where the modality is absent: (N, d) -> (N, d + 1)."""
    h = torch.where(present.unsqueeze(-1), h, 0.0)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=-1)


def _mlp_head(in_dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out)
    )


# ------------------------------------------------------------------------------------------ TFN
class TFNModel(PaSEModel):
    """Tensor Fusion Network: the flattened outer product of ``[h_m; 1]`` over modalities.

    Each modality's feature is first reduced by a linear map to ``width`` dimensions (8 by
    default: three modalities give ``9**3 = 729`` fused dimensions); the appended constant 1 keeps
    every unimodal and bimodal term of the product besides the trimodal ones. An absent modality
    contributes ``[0 ... 0; 1]``, so the product keeps exactly the terms of the present
    modalities. A post-fusion MLP (``config.dim`` hidden units) gives the head's output.

    Args:
        config: The suite's configuration (``config.dim``: encoder width and head width).
        encoders: Optional encoders, as for :class:`PaSEModel`.
        width: Reduced width of each modality before the outer product.
    """

    def __init__(
        self,
        config: PaSEConfig,
        encoders: Mapping[str, nn.Module] | None = None,
        *,
        width: int = 8,
    ) -> None:
        super().__init__(config, encoders)
        c = config
        self.reduce = nn.ModuleDict({m: nn.Linear(c.dim, width) for m in c.modalities})
        fused_dim = (width + 1) ** len(c.modalities)
        self.head = _mlp_head(fused_dim, c.dim, c.num_outputs, c.dropout)

    def head_output(self, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> Tensor:
        z = None
        for m in self.modalities:
            zm = _with_one(self.reduce[m](feats[m]), present[m])
            z = zm if z is None else (z.unsqueeze(-1) * zm.unsqueeze(1)).flatten(1)
        return self.head(z)


# ------------------------------------------------------------------------------------------ LMF
class LMFModel(PaSEModel):
    r"""Low-rank Multimodal Fusion: the tensor of TFN with rank-``r`` modality-specific factors.

    Each modality has ``r`` factors :math:`W_m^{(i)} \in \mathbb R^{(d_m + 1) \times h}`; the
    fused vector is :math:`\sum_i \omega_i \prod_m W_m^{(i)\top} [h_m; 1] + b` (elementwise
    product over modalities), i.e. the TFN weight tensor constrained to rank ``r``, computed
    without forming the tensor. An absent modality contributes ``[0 ... 0; 1]`` (its factor
    reduces to the factor's last row). An MLP head follows (``h = config.dim``).

    Args:
        config: The suite's configuration.
        encoders: Optional encoders, as for :class:`PaSEModel`.
        rank: Rank ``r`` of the factorisation.
    """

    def __init__(
        self,
        config: PaSEConfig,
        encoders: Mapping[str, nn.Module] | None = None,
        *,
        rank: int = 4,
    ) -> None:
        super().__init__(config, encoders)
        c = config
        self.rank = rank
        self.factors = nn.ParameterDict()
        for m in c.modalities:
            w = torch.empty(rank, c.dim + 1, c.dim)
            for i in range(rank):  # each factor's output has about unit scale on unit features
                nn.init.xavier_normal_(w[i])
            self.factors[m] = nn.Parameter(w)
        self.fusion_weights = nn.Parameter(torch.full((rank,), 1.0 / math.sqrt(rank)))
        self.fusion_bias = nn.Parameter(torch.zeros(c.dim))
        self.head = _mlp_head(c.dim, c.dim, c.num_outputs, c.dropout)

    def head_output(self, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> Tensor:
        prod = None
        for m in self.modalities:
            zm = _with_one(feats[m], present[m])  # (N, d + 1)
            fm = torch.einsum("nd,rdo->rno", zm, self.factors[m])  # (r, N, h)
            prod = fm if prod is None else prod * fm
        fused = torch.einsum("r,rno->no", self.fusion_weights, prod) + self.fusion_bias
        return self.head(fused)


# ----------------------------------------------------------------------------------------- MulT
class TokenEncoder(nn.Module):
    """Frames -> ``K`` learned-query summary tokens, flattened: (N, T, F) -> (N, K * D).

    The same frame encoder as the reference :class:`~examples.pase.SequenceEncoder` (input
    projection + Transformer over the valid frames), then ``K`` learned queries attend to the
    valid frames (attention pooling) and a LayerNorm follows. A sequence without a valid frame
    gives zeros (the modality is absent anyway). Vector inputs (``(N, F)``) go through an MLP to
    ``K * D`` directly.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        tokens: int,
        layers: int,
        heads: int,
        dropout: float,
        kind: str = "sequence",
    ) -> None:
        super().__init__()
        self.dim, self.tokens, self.kind = dim, tokens, kind
        if kind == "vector":
            self.mlp = MLPEncoder(in_dim, tokens * dim)
            return
        self.proj = nn.Linear(in_dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(tokens, dim) / math.sqrt(dim))
        self.pool = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.kind == "vector":
            return self.mlp(x)
        any_valid = mask.any(dim=1, keepdim=True)
        attn_mask = mask | ~any_valid  # an empty sequence attends to everything, zeroed below
        h = self.encoder(self.proj(x), src_key_padding_mask=~attn_mask)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, key_padding_mask=~attn_mask, need_weights=False)
        out = self.norm(pooled + q) * any_valid.unsqueeze(-1).to(h.dtype)
        return out.flatten(1)


class CrossModalBlock(nn.Module):
    """One MulT cross-modal block ``source -> target`` with a key padding mask.

    ``x = x + Attn(LN(x), LN(y), LN(y))``, then ``x = x + FFN(LN(x))`` (pre-norm, as MulT).
    Masked keys get exactly zero attention weight; a row without a valid key gets no attention
    term at all (the residual stream passes unchanged to the feed-forward), without NaN in the
    forward or the backward pass.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads})")
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_ff = (nn.LayerNorm(dim) for _ in range(3))
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor, key_valid: Tensor) -> Tensor:
        """``x`` (N, Lq, D) target, ``y`` (N, Lk, D) source, ``key_valid`` (N, Lk) bool."""
        n, lq, d = x.shape
        lk, h = y.shape[1], self.heads
        q = self.q(self.norm_q(x)).view(n, lq, h, d // h).transpose(1, 2)
        kv = self.norm_kv(y)
        k = self.k(kv).view(n, lk, h, d // h).transpose(1, 2)
        v = self.v(kv).view(n, lk, h, d // h).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (N, h, Lq, Lk)
        valid = key_valid[:, None, None, :]
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1) * valid.to(scores.dtype)  # exact zeros on masked keys
        att = (weights @ v).transpose(1, 2).reshape(n, lq, d)
        any_key = key_valid.any(-1).to(x.dtype)[:, None, None]
        x = x + any_key * self.drop(self.o(att))
        return x + self.drop(self.ff(self.norm_ff(x)))


class MulTModel(PaSEModel):
    """Cross-modal attention fusion in the style of MulT, on learned summary tokens.

    **Design.** :meth:`fuse` only sees one ``(N, D')`` vector per modality, and it must stay a
    pure function of ``(feats, present)`` for the Shapley game. So the encoders
    (:class:`TokenEncoder`) keep a token-level view: each modality's frames are encoded by the
    reference frame Transformer and summarised by ``K`` learned queries into ``K`` tokens of width
    ``D``, and the *feature* of a modality is those tokens flattened, ``(N, K * D)``. The model's
    own config therefore has ``dim = K * D`` (``K`` and ``D`` are the model's ``tokens`` and
    ``token_dim``), so the unimodal heads, the prototype calibrators and every method that sizes
    itself by ``config.dim`` (PMR, MLA, CGGM) read the flattened tokens; linear probes read them
    too.

    **Fusion** (:meth:`head_output`), MulT's structure on the tokens: for every target modality
    ``a`` and every other modality ``b``, a :class:`CrossModalBlock` ``b -> a`` (queries: ``a``'s
    tokens, keys/values: ``b``'s); the ``M - 1`` outputs are concatenated along the features
    (``(N, K, (M - 1) D)``), go through one self-attention Transformer layer, and are averaged
    over the ``K`` tokens into ``a``'s stream; the streams are concatenated and an MLP head gives
    the output. A single modality (the suite's ``alone`` runs) has no source: its stream is its
    own tokens through the self-attention layer.

    **Absent modalities.** ``b`` absent for a sample: its tokens are masked out of the keys of
    every block ``b -> a`` (key padding mask: no attention term, the target's residual passes);
    ``a`` absent: its stream is zeroed. Either way the output does not depend on the absent
    modality's features.

    Args:
        config: The suite's configuration; ``config.dim`` is the token width ``D``.
        tokens: ``K``, summary tokens per modality.
    """

    def __init__(self, config: PaSEConfig, *, tokens: int = 4) -> None:
        c, d = config, config.dim
        encoders = {
            m: TokenEncoder(
                c.input_dims[m], d, tokens, c.layers, c.heads, c.dropout, kind=c.input_kind
            )
            for m in c.modalities
        }
        super().__init__(dataclasses.replace(c, dim=tokens * d), encoders)
        self.tokens, self.token_dim = tokens, d
        mods = c.modalities
        self.cross = nn.ModuleDict(
            {
                f"{b}_to_{a}": CrossModalBlock(d, c.heads, c.dropout)
                for a in mods
                for b in mods
                if a != b
            }
        )
        width = max(len(mods) - 1, 1) * d
        self.self_attn = nn.ModuleDict(
            {
                a: nn.TransformerEncoderLayer(
                    width, c.heads, 2 * width, c.dropout, batch_first=True, norm_first=True
                )
                for a in mods
            }
        )
        self.head = _mlp_head(len(mods) * width, d, c.num_outputs, c.dropout)

    def head_output(self, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> Tensor:
        tok = {m: f.reshape(f.shape[0], self.tokens, self.token_dim) for m, f in feats.items()}
        streams = []
        for a in self.modalities:
            pairs = [
                self.cross[f"{b}_to_{a}"](
                    tok[a], tok[b], present[b].unsqueeze(1).expand(-1, self.tokens)
                )
                for b in self.modalities
                if b != a
            ]
            z = torch.cat(pairs, dim=-1) if pairs else tok[a]
            stream = self.self_attn[a](z).mean(1)
            streams.append(torch.where(present[a].unsqueeze(-1), stream, 0.0))
        return self.head(torch.cat(streams, dim=-1))


# ------------------------------------------------------------------------------------ registry
#: Backbones by name: a :class:`PaSEModel` subclass, or ``None`` for the reference late fusion.
BACKBONES: dict[str, type[PaSEModel] | None] = {
    "late": None,
    "tfn": TFNModel,
    "lmf": LMFModel,
    "mult": MulTModel,
}


def make_model(name: str, config: PaSEConfig) -> PaSEModel:
    """The backbone ``name`` (a key of :data:`BACKBONES`) built from ``config``.

    ``late`` is :class:`PaSEModel` itself. ``mult``'s model carries its own config (``dim`` =
    tokens x token width); ``config`` is not modified.

    Raises:
        ValueError: An unknown name.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    cls = BACKBONES[name]
    return PaSEModel(config) if cls is None else cls(config)
