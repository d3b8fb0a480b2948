"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg, "Large Batch Training of
Convolutional Networks", 2017, Algorithm 1), with momentum.

Each weight tensor's step is scaled by a trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)``, so
that every layer moves by about the same fraction of its norm however large the batch and the
learning rate; biases and normalisation parameters (the ``lars=False`` group of
:func:`tsmtrain.optim.param_groups`, by default: ``optim.lars_exclude``) take plain SGD steps,
without weight decay by default (``optim.exclude_from_decay``).
"""

from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """LARS with momentum (You et al. 2017, Algorithm 1).

    For each parameter tensor ``w`` with gradient ``g`` in a group with ``lars=True``::

        trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 when ||w|| or ||g|| is 0)
        v     = momentum * v + lr * trust * (g + wd * w)
        w     = w - v

    In a group with ``lars=False`` (biases, norm layers) ``trust = 1`` and, as set up by
    :func:`param_groups` by default, ``wd = 0``: plain SGD with momentum.

    Args:
        params: parameters or param groups (groups may set ``lars``, ``weight_decay``, ...).
        lr: global learning rate (the schedule sets it every step).
        momentum: momentum ``m``.
        weight_decay: ``wd`` (L2 penalty).
        trust_coefficient: ``eta``.
        eps: added to the denominator of the trust ratio.
        sum_across: for a tensor split across ranks (a head sharded by
            :mod:`tsmtrain.dist.head_parallel`): a function summing a tensor over the ranks; the
            norms ``||w||`` and ``||g||`` are then those of the whole tensor (the squares of
            every rank's slice summed), so the sharded step equals the unsharded one. ``None``:
            each tensor is whole on this rank.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-9, sum_across=None):
        self.sum_across = sum_across
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, eps, mom, lr = (group["weight_decay"], group["trust_coefficient"], group["eps"],
                                     group["momentum"], group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                update = g.add(p, alpha=wd) if wd else g.clone()
                if group["lars"]:
                    w_norm, g_norm = self._norms(p, g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / (g_norm + wd * w_norm + eps), torch.ones_like(w_norm)
                    )
                    update.mul_(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.mul_(lr)
                else:
                    buf.mul_(mom).add_(update, alpha=lr)
                p.sub_(buf)
        return loss

    def _norms(self, p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||w||, ||g||)`` of the whole tensor (summed over the ranks' shards with ``sum_across``).

        Each shard's norm is computed in place, as the unsharded one is; only the two norms are
        squared (in float64) and summed over the ranks, so no shard-sized copy is made."""
        if self.sum_across is None:
            return torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
        squares = torch.stack([torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)]).double().square()
        w2, g2 = self.sum_across(squares).to(p.dtype).sqrt()
        return w2, g2
