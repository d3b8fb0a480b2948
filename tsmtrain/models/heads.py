"""Classifier heads on pooled video features: linear, and YouTube-8M's Mixture of Experts.

The Mixture-of-Experts classifier (Abu-El-Haija et al. 2016, "YouTube-8M: A Large-Scale Video
Classification Benchmark", sec. 4.3; ``MoeModel`` of the starter code) scores each class ``c``
independently with ``M`` experts: gates ``g_c = softmax([w_c1.x, ..., w_cM.x, 0])`` over the M
experts and a dummy expert whose logit is 0, experts ``sigmoid(e_ck)``, ``e_ck = v_ck.x + b_ck``,
and ``p_c = sum_{k<=M} g_ck sigmoid(e_ck)``: the dummy expert always says "no", so the gates can
send a class's probability towards 0. It is a per-class probability, so it goes with the
binary (sigmoid) loss, not with softmax.

:class:`MoEHead` returns the log-odds ``log p_c - log(1 - p_c)``, computed stably with
``logsumexp`` (``1 - p_c = g_c,dummy + sum_k g_ck sigmoid(-e_ck)``), so that
``torch.sigmoid`` of its output is ``p_c`` and ``binary_cross_entropy_with_logits`` is the
binary cross-entropy of ``p_c``, as for a linear head.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoEHead", "FeatureClassifier", "create_head", "shard_classifier", "HEADS", "INIT_BLOCK"]

HEADS = ("linear", "moe")


class MoEHead(nn.Module):
    """Mixture of Experts over ``num_mixtures`` experts per class, with a dummy expert.

    Args:
        in_features: D, the feature size.
        num_classes: K.
        num_mixtures: M (>= 1).

    Parameters: ``gates`` ``Linear(D, K*M)`` (the dummy expert has no weights: logit 0) and
    ``experts`` ``Linear(D, K*M)``.

    Input ``(N, D)``; output log-odds ``(N, K)`` (:meth:`probabilities` for ``p``).

    Raises:
        ValueError: ``num_mixtures < 1``.
    """

    def __init__(self, in_features: int, num_classes: int, num_mixtures: int = 2):
        super().__init__()
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
        self.num_classes, self.num_mixtures = num_classes, num_mixtures
        self.gates = nn.Linear(in_features, num_classes * num_mixtures)
        self.experts = nn.Linear(in_features, num_classes * num_mixtures)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log gate probabilities ``(N, K, M+1)`` (the dummy expert last) and expert logits ``(N, K, M)``."""
        n, k, m = x.shape[0], self.num_classes, self.num_mixtures
        gate_logits = self.gates(x).view(n, k, m)
        gate_logits = torch.cat([gate_logits, gate_logits.new_zeros(n, k, 1)], dim=2)
        return F.log_softmax(gate_logits.float(), dim=2), self.experts(x).view(n, k, m).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_gates, experts = self._parts(x)
        log_p = torch.logsumexp(log_gates[..., :-1] + F.logsigmoid(experts), dim=2)
        log_not = torch.logsumexp(torch.cat([log_gates[..., -1:], log_gates[..., :-1] + F.logsigmoid(-experts)], 2),
                                  dim=2)
        return log_p - log_not

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``p`` ``(N, K)`` by the formula itself: ``sum_k g_k sigmoid(e_k)``."""
        log_gates, experts = self._parts(x)
        return (log_gates[..., :-1].exp() * torch.sigmoid(experts)).sum(2)


def create_head(kind: str, in_features: int, num_classes: int, num_mixtures: int = 2) -> nn.Module:
    """A classifier ``(N, D) -> (N, K)``: ``"linear"`` (``nn.Linear``, initialised as TSN/TSM do:
    weights N(0, 0.001), bias 0) or ``"moe"`` (:class:`MoEHead`).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "linear":
        head = nn.Linear(in_features, num_classes)
        nn.init.normal_(head.weight, 0, 0.001)
        nn.init.zeros_(head.bias)
        return head
    if kind == "moe":
        return MoEHead(in_features, num_classes, num_mixtures)
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


class FeatureClassifier(nn.Module):
    """The classifier alone, trained on extracted features (``data.features``): dropout, then the
    head :func:`create_head` builds. It has the interface of
    :class:`~tsmtrain.models.networks.VideoNet` that training and a sharded head use:
    :meth:`features` and ``fc``, with ``forward(x) == fc(features(x))``.

    Args:
        in_features: D, the feature size (512 for ResNet-18, 2048 for ResNet-50).
        num_classes: K.
        head: ``"linear"`` or ``"moe"``.
        num_mixtures: experts per class of the ``moe`` head.
        dropout: dropout probability on the features.

    Input features ``(N, D)`` float; output logits (log-odds for ``moe``) ``(N, K)``.

    Raises:
        ValueError: an unknown ``head``; in ``forward``, features of another size.
    """

    def __init__(self, in_features: int, num_classes: int, head: str = "linear", num_mixtures: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        self.head, self.feature_dim, self.num_classes = head, in_features, num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc = create_head(head, in_features, num_classes, num_mixtures)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, D)`` after dropout (identity in eval mode)."""
        if x.dim() != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"expected features (N, {self.feature_dim}), got input of shape {tuple(x.shape)}")
        return self.dropout(x.float())

    def forward(self, x: torch.Tensor, classify: bool = True) -> torch.Tensor:
        """Logits ``(N, K)``; ``classify=False``: the features ``(N, D)`` after dropout."""
        features = self.features(x)
        return self.fc(features) if classify else features


INIT_BLOCK = 1024
"""Classes per block of a sharded head's initialisation (:func:`shard_classifier`)."""


def shard_classifier(model: nn.Module, lo: int, hi: int, seed: int) -> nn.Module:
    """Give ``model`` (a :class:`~tsmtrain.models.networks.VideoNet` or :class:`FeatureClassifier`)
    only the classes ``[lo, hi)`` of its classifier, in place (``model.head_parallel``; the shard
    is ``model.fc``, ``model.num_classes`` stays the whole vocabulary K). Returns ``model``.

    Every parameter of the head is class-major (a linear head's rows, an MoE head's ``K*M`` gate
    and expert rows), so a shard is a slice of rows. The shard's weights are drawn block by
    block of :data:`INIT_BLOCK` classes, each block from its own generator seeded by ``seed``,
    the parameter's name and the block: any split of the classes over any number of ranks
    starts from the same head. The distributions are those of :func:`create_head`: a linear
    head N(0, 0.001) with bias 0; an MoE head ``nn.Linear``'s U(-1/sqrt(D), 1/sqrt(D)). The
    whole head is released before the shard is built and one block is drawn at a time, so the
    memory held at once is the larger of the two heads, never their sum; the shard is put on
    the device the whole head was on (call this before moving a large model to a GPU).

    Raises:
        ValueError: an empty or out-of-range ``[lo, hi)``.
    """
    k = model.num_classes
    if not 0 <= lo < hi <= k:
        raise ValueError(f"classes [{lo}, {hi}) are not a shard of {k} classes")
    mixtures = getattr(model.fc, "num_mixtures", 1)
    device = next(model.fc.parameters()).device
    model.fc = nn.Identity()  # the whole head is freed before the shard is built: never both at once
    head = create_head(model.head, model.feature_dim, hi - lo, mixtures)
    with torch.no_grad():
        for name, p in head.named_parameters():
            _draw_rows(model.head, name, p, lo, hi, k, model.feature_dim, seed)
    model.fc = head.to(device)
    return model


def _draw_rows(kind: str, name: str, p: torch.Tensor, lo: int, hi: int, k: int, d: int, seed: int) -> None:
    """Fill ``p``, the rows of classes ``[lo, hi)`` of head parameter ``name``, block by block
    (:func:`shard_classifier`; one block of :data:`INIT_BLOCK` classes in memory at a time)."""
    rows = p.shape[0] // (hi - lo)  # rows per class: 1, or M experts
    for block in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1):
        first = block * INIT_BLOCK
        count = min(INIT_BLOCK, k - first)
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + block) % 2**63)
        shape = (count * rows, *p.shape[1:])
        if kind == "linear":
            full = torch.randn(shape, generator=g) * 0.001 if name == "weight" else torch.zeros(shape)
        else:
            bound = 1 / math.sqrt(d)
            full = torch.rand(shape, generator=g) * (2 * bound) - bound
        start, stop = max(lo, first), min(hi, first + count)
        p[(start - lo) * rows:(stop - lo) * rows] = full[(start - first) * rows:(stop - first) * rows]
