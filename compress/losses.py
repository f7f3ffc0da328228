"""Knowledge-distillation losses: pure tensor functions, no modules, no state.

A KD divergence compares teacher p and student q = softmax(logits / temperature) per token,
sums over the vocabulary, averages over masked tokens and is scaled by temperature**2 so its
gradient keeps the same size across temperatures (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"). Everything is computed in float32.

    loss = kd_loss(student_logits, teacher_logits, kind="jsd", temperature=2.0, mask=mask)
    ids, logprobs = teacher_topk(teacher_logits, k=64, temperature=2.0)  # what a cache stores
    loss = kd_loss(student_logits, teacher_topk=(ids, logprobs), teacher_vocab=Vt, temperature=2.0)
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from compress.errors import CompressError

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")

# Probabilities are floored at the smallest normal float32 (log-probs at about -87.3), the
# same floor as the tail bin's: below it p * log(p / q) is ~1e-36, nothing. A floor at -inf (or
# at float32's min) makes KL(q || p) infinite wherever the teacher gives an id zero probability;
# this one caps the cost at ~87 nats per unit of student mass there and keeps every forward and
# backward free of -inf - (-inf).
_TINY = torch.finfo(torch.float32).tiny
_LOG_FLOOR = math.log(_TINY)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1).clamp_min(_LOG_FLOOR)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probs, summed over the last dim: (..., V) -> (...)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q) computed in log space."""
    if w == 0:
        return logq  # log(0) would be -inf; the mixture is just q
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def _jsd(logp, logq, beta, alpha):
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


# kind -> per-token divergence(logp, logq, beta, skew_alpha); p = teacher, q = student.
_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": lambda logp, logq, beta, alpha: _kl(logp, logq),
    "reverse_kl": lambda logp, logq, beta, alpha: _kl(logq, logp),
    "jsd": _jsd,  # GKD, Agarwal et al. 2024
    "skew_kl": lambda logp, logq, beta, alpha: _kl(logp, _log_mix(logp, logq, alpha)),
    "skew_reverse_kl": lambda logp, logq, beta, alpha: _kl(logq, _log_mix(logq, logp, alpha)),
}


def _with_rest(logp_k: torch.Tensor) -> torch.Tensor:
    """Append the tail bin log(1 - sum exp(logp_k)): (..., k) -> (..., k+1)."""
    # -expm1(log s) = 1 - s is accurate when s is close to 1; clamping keeps k = V finite.
    rest = torch.log(torch.clamp_min(-torch.expm1(torch.logsumexp(logp_k, -1)), _TINY))
    return torch.cat([logp_k, rest.unsqueeze(-1)], dim=-1)


def _masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of (B, T) values over positions where mask is set (0 when none is)."""
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise CompressError(
            f"mask has shape {tuple(mask.shape)} but the tokens are {tuple(per_token.shape)}; "
            "pass mask as (B, T) with one 0/1 flag per token"
        )
    keep = mask.to(device=per_token.device).bool()
    # where, not multiply: garbage (inf/nan) at padded positions must not leak into the sum.
    return torch.where(keep, per_token, 0.0).sum() / keep.sum().clamp_min(1)


def _check_k(name: str, k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CompressError(f"{name}={k!r} must be an integer >= 1 (None = the full vocabulary)")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise CompressError(f"temperature={temperature!r} must be a finite number > 0, e.g. 1.0")


def _topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k > logp.shape[-1]:
        raise CompressError(f"top_k={k} exceeds the vocabulary size {logp.shape[-1]}; use k <= V")
    logp_k, ids = logp.topk(k, dim=-1)
    return ids, logp_k


def teacher_topk(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher's top-k ids and log-probs at `temperature`, for kd_loss(teacher_topk=...).

    (B, T, V) -> ids (B, T, k) long, logprobs (B, T, k) float32. This is what an offline KD
    cache stores; the rest of the mass becomes one tail bin inside kd_loss.

        ids, logprobs = teacher_topk(teacher_logits, k=64, temperature=2.0)
    """
    _check_k("k", k)
    _check_temperature(temperature)
    return _topk(_log_softmax(teacher_logits, temperature), k)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    teacher_vocab: Optional[int] = None,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Distillation loss between student (B, T, Vs) and teacher (B, T, Vt) logits -> scalar.

    kind: forward_kl KL(p||q); reverse_kl KL(q||p); jsd, the generalized JSD of GKD (Agarwal
    et al. 2024), beta*KL(p||m) + (1-beta)*KL(q||m) with m = beta*p + (1-beta)*q; skew_kl
    KL(p || a*p + (1-a)*q) and skew_reverse_kl KL(q || a*q + (1-a)*p) with a = skew_alpha
    (DistiLLM, Ko et al. 2024). p = teacher, q = student, both at `temperature`.
    Vs != Vt (padding rows) compares the shared ids [:min(Vs, Vt)]: the student's softmax
    never sees its extra rows.

    top_k=k (or teacher_topk=(ids, logprobs) from `teacher_topk`) reduces both distributions
    to k+1 bins: the teacher's top-k ids plus one tail bin; exact when k = V. teacher_topk=
    needs teacher_vocab=Vt, which the ids cannot tell; with Vs >= Vt it then equals top_k=k.

        loss = kd_loss(student_logits, teacher_logits, kind="skew_kl", temperature=2.0, mask=m)
    """
    per_token = kd_per_token(student_logits, teacher_logits, kind=kind, temperature=temperature, top_k=top_k,
                             teacher_topk=teacher_topk, teacher_vocab=teacher_vocab, beta=beta, skew_alpha=skew_alpha)
    return _masked_mean(per_token, mask) * temperature**2


def kd_per_token(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    teacher_vocab: Optional[int] = None,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """The divergence of ``kd_loss`` at each token, unscaled: (..., V) -> (...) float32.

    ``kd_loss`` is its masked mean times temperature**2; a chunked loss sums it chunk by chunk.
    """
    if kind not in _DIVERGENCES:
        raise CompressError(f"kind={kind!r} is unknown; use one of {', '.join(KD_LOSSES)}")
    _check_temperature(temperature)
    if not 0 < beta < 1:
        raise CompressError(f"beta={beta!r} must be in (0, 1) exclusive, e.g. 0.5")
    if not 0 <= skew_alpha < 1:
        raise CompressError(f"skew_alpha={skew_alpha!r} must be in [0, 1), e.g. 0.1")
    if top_k is not None:
        _check_k("top_k", top_k)
    lead = student_logits.shape[:-1]  # (B, T)

    if teacher_topk is not None:
        if teacher_logits is not None:
            raise CompressError("pass teacher_logits or teacher_topk=(ids, logprobs), not both")
        ids, teacher_logp_k = teacher_topk
        if ids.shape != teacher_logp_k.shape or ids.shape[:-1] != lead:
            raise CompressError(
                f"teacher_topk ids {tuple(ids.shape)} and logprobs {tuple(teacher_logp_k.shape)} "
                f"must both be (B, T, k) with (B, T) = {tuple(lead)}, as teacher_topk() returns"
            )
        if top_k is not None and top_k != ids.shape[-1]:
            raise CompressError(f"top_k={top_k} != teacher_topk's k={ids.shape[-1]}; drop top_k")
        if teacher_vocab is None:
            raise CompressError("teacher_topk needs teacher_vocab= (the teacher's vocabulary size, e.g. TopkCache.vocab_size) to leave student padding rows out")
        V = min(student_logits.shape[-1], teacher_vocab)
        if ids.numel() and int(ids.max()) >= V:
            raise CompressError(
                f"teacher_topk ids reach {int(ids.max())} but student ({student_logits.shape[-1]}) and teacher "
                f"({teacher_vocab}) share only {V} ids; the cache was made for another tokenizer"
            )
        logq = _log_softmax(student_logits[..., :V], temperature)  # (B, T, V)
        logp = _with_rest(teacher_logp_k.float().clamp_min(_LOG_FLOOR))  # (B, T, k+1)
        logq = _with_rest(logq.gather(-1, ids.to(logq.device)))  # (B, T, k+1)
    elif teacher_logits is None:
        raise CompressError("no teacher given; pass teacher_logits or teacher_topk=(ids, logprobs)")
    else:
        if teacher_logits.shape[:-1] != lead:
            raise CompressError(
                f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                f"{tuple(student_logits.shape)} must share (B, T); feed both the same batch"
            )
        if teacher_vocab not in (None, teacher_logits.shape[-1]):
            raise CompressError(f"teacher_vocab={teacher_vocab} but teacher_logits has {teacher_logits.shape[-1]} ids; drop teacher_vocab")
        V = min(student_logits.shape[-1], teacher_logits.shape[-1])
        logq = _log_softmax(student_logits[..., :V], temperature)  # (B, T, V)
        logp = _log_softmax(teacher_logits[..., :V], temperature)  # (B, T, V)
        if top_k is not None:
            ids, logp_k = _topk(logp, top_k)
            logp, logq = _with_rest(logp_k), _with_rest(logq.gather(-1, ids))  # (B, T, k+1)

    return _DIVERGENCES[kind](logp, logq, beta, skew_alpha)  # (B, T)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross entropy of logits (B, T, V) against labels (B, T) already aligned (no shift here).

    Mean over labels != ignore_index, in float32; 0 when every label is ignored.

        loss = ce_loss(logits[:, :-1], input_ids[:, 1:])
    """
    if logits.shape[:-1] != labels.shape:
        raise CompressError(
            f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus the "
            "vocab dim; shift labels to align with logits before calling ce_loss"
        )
    total = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return total / (labels != ignore_index).sum().clamp_min(1)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    proj: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSE between proj(student_hidden) (B, T, Ds) -> (B, T, D) and teacher_hidden (B, T, D).

    Hidden-state distillation with a learned regressor when widths differ (FitNets, Romero
    et al. 2015). Mean over masked tokens and features, in float32.

        loss = hidden_mse(h_s, h_t, proj=nn.Linear(Ds, D), mask=mask)
    """
    h = student_hidden if proj is None else proj(student_hidden)
    if h.shape != teacher_hidden.shape:
        raise CompressError(
            f"student hidden {tuple(h.shape)} vs teacher hidden {tuple(teacher_hidden.shape)}; "
            "pass proj= (e.g. nn.Linear(Ds, D)) to map student width to teacher width"
        )
    per_token = (h.float() - teacher_hidden.float()).pow(2).mean(-1)  # (B, T)
    return _masked_mean(per_token, mask)
