"""Teacher-relative quality on held-out blocks: perplexity, top-1 agreement, KL(teacher‖student).

At this scale these are the sensitive signals of what compression cost: a student can keep
MMLU at chance level like its teacher and still drift far from it token by token.

    m = pair_metrics(student_logits_fn, teacher_logits_fn, val_blocks)
    m["student_ppl"], m["teacher_ppl"], m["ppl_ratio"], m["top1_agreement"], m["kl"]
    bits_per_byte(student_fn, teacher_fn, val_blocks, student_tok, teacher_tok)  # different tokenizers

Runs on every rank over a disjoint shard of the blocks and all-reduces the sums, so it works
with ZeRO-3 partitioned models (every rank calls forward the same number of times).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, V) logits


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def pair_metrics(student: LogitsFn, teacher: LogitsFn | None, blocks: torch.Tensor, *, batch_size: int = 8,
                 rank: int = 0, world: int = 1, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Sums over this rank's share of ``blocks`` ((N, T+1) token ids), reduced over ranks."""
    from tqdm.auto import tqdm

    n = (len(blocks) // world) * world
    mine = blocks[rank:n:world]
    # sums: student nll, teacher nll, agreement, kl, tokens
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    starts = range(0, len(mine), batch_size)
    for i in tqdm(starts, desc="teacher-relative metrics", disable=not progress or rank != 0, leave=False):
        chunk = mine[i : i + batch_size].long().to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        s_logp = F.log_softmax(student(x).float(), dim=-1)
        sums[0] += -s_logp.gather(-1, y[..., None]).sum()
        sums[4] += y.numel()
        if teacher is not None:
            t_logp = F.log_softmax(teacher(x).float(), dim=-1)
            v = min(s_logp.shape[-1], t_logp.shape[-1])  # vocabularies padded to different sizes
            s_v, t_v = s_logp[..., :v], t_logp[..., :v]
            sums[1] += -t_logp.gather(-1, y[..., None]).sum()
            sums[2] += (s_v.argmax(-1) == t_v.argmax(-1)).sum()
            sums[3] += (t_v.exp() * (t_v - s_v)).sum()
    s_nll, t_nll, agree, kl, tokens = _all_reduce(sums).tolist()
    out = {"student_ppl": math.exp(s_nll / tokens), "eval_tokens": int(tokens)}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(t_nll / tokens), top1_agreement=agree / tokens, kl=kl / tokens)
        out["ppl_ratio"] = out["student_ppl"] / out["teacher_ppl"]
    return out


@torch.no_grad()
def bits_per_byte(student: LogitsFn, teacher: LogitsFn, blocks: torch.Tensor, student_tok, teacher_tok, *,
                  batch_size: int = 8, rank: int = 0, world: int = 1, device: str | torch.device = "cpu") -> dict:
    """Student and teacher with different tokenizers, on the same held-out text: bits per UTF-8
    byte, the measure that does not depend on how a text is cut into tokens.

    ``blocks`` are the student's (N, T+1) ids. Each model predicts all but the first token of its
    own tokenization of each block's text (the teacher's made by ``align_batch``); its bits are
    summed over those tokens and divided by their bytes. So the two cover the same text up to the
    first token of each block. Special tokens count their loss and no bytes.
    """
    from compress.cross_tokenizer import align_batch, token_bytes

    n = (len(blocks) // world) * world
    mine = blocks[rank:n:world]
    s_len = torch.tensor([len(b) for b in token_bytes(student_tok)], dtype=torch.float64)
    t_len = torch.tensor([len(b) for b in token_bytes(teacher_tok)], dtype=torch.float64)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # student nats, bytes; teacher nats, bytes
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size].long()
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
        s_logp = F.log_softmax(student(x).float(), dim=-1)
        sums[0] += -s_logp.gather(-1, y[..., None]).sum()
        sums[1] += s_len[chunk[:, 1:]].sum()
        al = align_batch(chunk, student_tok, teacher_tok)
        ids, keep = al["teacher_ids"], al["teacher_mask"][:, 1:]
        t_logp = F.log_softmax(teacher(ids[:, :-1].to(device)).float(), dim=-1)
        nll = -t_logp.gather(-1, ids[:, 1:, None].to(device))[..., 0]
        sums[2] += nll[keep.to(device)].sum()
        sums[3] += t_len[ids[:, 1:][keep]].sum()
    s_nats, s_bytes, t_nats, t_bytes = _all_reduce(sums).tolist()
    out = {"student_bpb": s_nats / s_bytes / math.log(2), "teacher_bpb": t_nats / t_bytes / math.log(2),
           "eval_bytes": int(s_bytes)}
    out["bpb_ratio"] = out["student_bpb"] / out["teacher_bpb"]
    return out
