"""Distillation from final hidden states and the LM heads, token chunk by token chunk.

Naive KD keeps the student's logits (N, V) for the backward pass, the teacher's (N, V), and
float32 log-softmax copies of both: at N = B·T = 8,192 tokens and V = 49,152 each fp32 copy is
1.6 GB. Here the student's LM head sees only a few tokens in the model's own forward (its input,
the final hidden states, is captured by a pre-hook); then, for each chunk of c tokens, the loss
computes the chunk's student and teacher logits, the chunk's share of the loss and, in the same
forward, its gradient with respect to the chunk's hidden states and the head's parameters (the
idea of Liger-Kernel's fused linear losses). Backward only scales those stored gradients. Peak
extra memory is a few (c, V) tensors, the (N, D) hidden-state gradient and one gradient of the
head, never (N, V); the matmuls are the naive loss's, done once each.

    terms = KDTerms(temperature=1.0, kind="forward_kl")
    with head_input_captured(student) as box:           # the LM head sees 1 token per row
        out = student(input_ids=x)
    loss, parts = chunked_head_loss(box["hidden"], student.get_output_embeddings(),
                                    lambda logits, rows: terms(logits, teachers(rows), rows, ...), chunk_tokens=1024)

The value and the gradients equal the naive loss's (``KDTerms`` on the full logits) up to
float summation order (tested in fp32 at 1e-5). The student's head must be a module whose
parameters are ordinary tensors (not partitioned by ZeRO-3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.losses import kd_per_token


@dataclass
class KDTerms:
    """One chunk's (or the whole batch's) share of ``sum_i w_i * KD_i + ce_weight * CE``.

    Each KD_i is the masked mean over ``n_mask`` tokens of ``kd_per_token`` times temperature²
    (what ``kd_loss`` returns); CE is the mean over ``n_labels`` labels. Summing the values of
    disjoint chunks gives the full loss.
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    top_k: int | None = None
    ce_weight: float = 0.0
    parts: dict = field(default_factory=dict)  # running sums of each term (floats, for logging)

    def __call__(self, logits: torch.Tensor, teachers: list[tuple[float, dict]], rows: slice = slice(None), *,
                 mask: torch.Tensor | None, labels: torch.Tensor | None, n_mask: torch.Tensor,
                 n_labels: torch.Tensor | None) -> torch.Tensor:
        """logits (n, V) of tokens ``rows`` of the batch; each teacher is (weight, kd_per_token kwargs:
        teacher_logits= or teacher_topk=, for those rows); mask and labels (N,) are the whole batch's."""
        mask = None if mask is None else mask[rows]
        labels = None if labels is None else labels[rows]
        value = logits.new_zeros((), dtype=torch.float32)
        kd = dict(kind=self.kind, temperature=self.temperature, beta=self.beta, skew_alpha=self.skew_alpha)
        for i, (weight, teacher) in enumerate(teachers):
            per = kd_per_token(logits, top_k=None if "teacher_topk" in teacher else self.top_k, **kd, **teacher)
            if mask is not None:
                per = torch.where(mask.to(per.device).bool(), per, 0.0)  # where: nan at masked rows must not leak
            term = per.sum() / n_mask.clamp_min(1) * self.temperature**2
            self._add(f"kd{i if len(teachers) > 1 else ''}", term)
            value = value + weight * term
        if self.ce_weight > 0:
            ce = F.cross_entropy(logits.float(), labels.to(logits.device), ignore_index=-100, reduction="sum")
            ce = ce / n_labels.clamp_min(1)
            self._add("ce", ce)
            value = value + self.ce_weight * ce
        return value

    def _add(self, key: str, v: torch.Tensor) -> None:
        self.parts[key] = self.parts.get(key, 0.0) + v.detach()


def softcapped(logits: torch.Tensor, config) -> torch.Tensor:
    """What a model's forward does after its LM head (Gemma 2's final_logit_softcapping), for
    logits computed from the head directly."""
    cap = getattr(config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


@contextlib.contextmanager
def head_input_captured(model: nn.Module):
    """While inside, ``model``'s output head keeps its input (``box["hidden"]``, (B, T, D), in the
    autograd graph) and computes logits for the first token of each row only."""
    head = model.get_output_embeddings()
    box: dict = {}

    def hook(module, args):
        box["hidden"] = args[0]
        return (args[0][..., :1, :],) + tuple(args[1:])  # 1 token, not 0: no empty-tensor corner cases

    handle = head.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss = sum over chunks of fn(head(hidden[chunk]), chunk); gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, run, *params):
        loss, grads = run(hidden, params)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (ctx.saved_tensors[0] * grad_out.to(ctx.saved_tensors[0].dtype), None,
                *(g * grad_out.to(g.dtype) for g in ctx.saved_tensors[1:]))


def chunked_head_loss(hidden: torch.Tensor, head: nn.Module,
                      fn: Callable[[torch.Tensor, slice], torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """``sum_c fn(head(h_c), rows_c)`` over chunks of ``chunk_tokens`` rows of ``hidden`` (B, T, D)
    flattened to (N, D); differentiable in ``hidden`` and the head's trainable parameters.

    ``fn(logits (n, V), rows)`` returns the chunk's share of the loss (so the shares sum to it).
    """
    params = [p for p in head.parameters() if p.requires_grad]

    def run(h, params):
        flat = h.reshape(-1, h.shape[-1])
        grad_h = torch.zeros_like(flat)
        grad_p = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, flat.shape[0], chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, flat.shape[0]))
            with torch.enable_grad():
                h_c = flat[rows].detach().requires_grad_(True)
                value = fn(head(h_c), rows)
                grads = torch.autograd.grad(value, [h_c, *params], allow_unused=True)
            grad_h[rows] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                if g is not None:
                    acc += g.float()
            total += value.detach().float()
        return total, (grad_h.view_as(h), *(g.to(p.dtype) for g, p in zip(grad_p, params)))

    return _ChunkedHeadLoss.apply(hidden, run, *params)
