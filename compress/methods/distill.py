"""Knowledge distillation as a stage of the one training loop.

    stages:
      - kind: distill
        loss: forward_kl        # reverse_kl | jsd | skew_kl | skew_reverse_kl
        temperature: 1.0
        ce_weight: 0.0          # mix in next-token CE on the data
        top_k: 64               # optional: teacher's top-k + a tail bin (memory)
        hidden_weight: 0.0      # optional: hidden-state MSE via a learned projection
        offline: {}             # optional: top-k teacher log-probs precomputed to disk
        chunk_tokens: 1024      # optional: the loss from hidden states + LM heads, 1024 tokens at a time
        on_policy: {lmbda: 0.5} # optional: GKD, a fraction of batches continued by the student's samples
        cross_tokenizer: {method: uld}  # a student with another tokenizer (student.tokenizer): ULD or GOLD

The loss is ``kd_weight * sum_i w_i KD_i + ce_weight * CE + hidden_weight * MSE`` over the teacher
(``teacher:``, weight ``teacher.weight``) and any ``extra_teachers:`` (losses in
``compress.losses``). Teachers run frozen under no_grad (``compress.teacher``).

``chunk_tokens`` (``compress.chunked_loss``) never materializes the B×T×V logits of the student
and a teacher together: same value and gradients as the full loss, a fraction of its memory.

``on_policy`` (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models"): with
probability ``lmbda`` a micro batch keeps only the first ``prompt_tokens`` of each block and
the student samples the rest (``compress.sampling``; ``source: teacher`` samples from the teacher:
sequence-level KD; ``source: interleaved`` has the student propose each token and the teacher
keep it when it is among its ``accept_top_k`` most probable, else sample its own: SKD, Xu et al.
2024); the teacher scores the sampled text in one forward and the loss covers the sampled
positions. The draw is a function of (seed, step, micro batch), so a resumed run draws the same,
and every rank makes the same choice (a ZeRO-3 student samples in lockstep).

``cross_tokenizer``: each student block is decoded and re-tokenized by the teacher
(``compress.cross_tokenizer.align_batch``); the loss compares the two models' next-token
distributions at the positions where a student and a teacher token end at the same byte, with ULD
(Boizard et al. 2024) or GOLD-style exact matching of the shared ids plus ULD on the rest. With
``offline`` (ULD only), the teacher's top-k is written once at the student positions it aligns with,
and ULD compares the k largest probabilities each side plus the mass beyond
(``compress.cross_tokenizer.uld_loss_topk``). ``hidden_weight`` compares hidden states at the aligned pairs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.chunked_loss import KDTerms, chunked_head_loss, head_input_captured, softcapped
from compress.config import Strict
from compress.data import sample_indices
from compress.errors import CompressError
from compress.losses import KD_LOSSES, ce_loss, hidden_mse
from compress.offline_kd import precompute
from compress.sampling import interleaved_continuations, sample_continuations
from compress.stages import StageConfig, StageMethod, register, with_model_losses


class OfflineKD(Strict):
    """Top-k teacher log-probs computed once to disk (sharded, resumable), streamed in training."""

    dir: str | None = None  # default: <output_dir>/stages/<i>-distill/teacher_topk
    shard_blocks: int = Field(64, ge=1)


class OnPolicy(Strict):
    """GKD: a fraction ``lmbda`` of micro batches are continuations sampled by the student (or the teacher)."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0)  # probability that a micro batch is sampled (GKD's λ)
    # teacher: sequence-level KD (Kim & Rush 2016); interleaved: the student proposes each token and the
    # teacher keeps it if it is among its accept_top_k most probable, else samples its own (SKD, Xu et al. 2024)
    source: Literal["student", "teacher", "interleaved"] = "student"
    accept_top_k: int = Field(25, ge=1)  # interleaved only (25: SKD's)
    prompt_tokens: int = Field(32, ge=1)  # the block's first tokens kept as the prompt; the rest is sampled
    temperature: float = Field(1.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _accept(self) -> "OnPolicy":
        if "accept_top_k" in self.model_fields_set and self.source != "interleaved":
            raise ValueError(f"on_policy.accept_top_k is the teacher's acceptance rule of source: interleaved; with "
                             f"source: {self.source} drop it")
        return self


class CrossTokenizer(Strict):
    """KD between a teacher and a student with different tokenizers (``compress.cross_tokenizer``)."""

    # uld: sorted-probability L1 over all ids (Boizard et al. 2024); gold: forward KL on the ids both
    # vocabularies share (same bytes) + ULD on the rest (TRL's GOLD idea)
    method: Literal["uld", "gold"] = "uld"
    top_k: int | None = Field(None, ge=1)  # ULD over the k largest probabilities each side + the rest's mass


# Liger-Kernel's jsd_beta for each of our divergences it computes (its beta is our jsd beta; 0 and 1
# are its forward and reverse KL)
LIGER_BETA = {"forward_kl": lambda beta: 0.0, "reverse_kl": lambda beta: 1.0, "jsd": lambda beta: beta}


class DistillStage(StageConfig):
    """Knowledge distillation (Hinton et al. 2015) with a choice of divergence."""

    kind: Literal["distill"] = "distill"
    loss: Literal[KD_LOSSES] = "forward_kl"  # type: ignore[valid-type]
    temperature: float = Field(1.0, gt=0.0)
    kd_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)  # mix in next-token cross entropy on the data
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # jsd mixture weight
    skew_alpha: float = Field(0.1, ge=0.0, lt=1.0)  # skew_kl / skew_reverse_kl
    top_k: int | None = Field(None, ge=1)  # keep only the teacher's top-k (+ a tail bin)
    hidden_weight: float = Field(0.0, ge=0.0)  # hidden-state MSE through a learned projection
    hidden_layers: list[Annotated[int, Field(ge=-1)]] = Field(default_factory=lambda: [-1])
    offline: OfflineKD | None = None  # needs top_k
    chunk_tokens: int | None = Field(None, ge=1)  # loss over token chunks from hidden states (memory)
    # who computes the chunked loss: ours (any option, CPU and GPU), or Liger-Kernel's fused linear
    # JSD (Triton; forward_kl / reverse_kl / jsd, one teacher, no CE, top_k or offline)
    chunk_backend: Literal["ours", "liger"] = "ours"
    on_policy: OnPolicy | None = None
    cross_tokenizer: CrossTokenizer | None = None  # needed when student.tokenizer differs from the teacher's

    @model_validator(mode="after")
    def _weights(self) -> "DistillStage":
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("all loss weights are 0; set kd_weight, ce_weight or hidden_weight > 0")
        if self.offline is not None and self.top_k is None:
            raise ValueError("offline KD stores top-k teacher log-probs: set top_k (e.g. 64)")
        if self.offline is not None and self.hidden_weight > 0:
            raise ValueError("offline KD stores no teacher hidden states: set hidden_weight=0")
        if self.on_policy is not None and self.offline is not None:
            raise ValueError("on_policy samples new text that the teacher must score as it trains; drop offline or on_policy")
        if (xt := self.cross_tokenizer) is not None:
            if self.top_k is not None and self.offline is None:
                raise ValueError("with cross_tokenizer, top_k only sets an offline cache's k; for ULD over the k "
                                 "largest probabilities set cross_tokenizer.top_k instead")
            if self.offline is not None and xt.method != "uld":
                raise ValueError("offline KD stores the teacher's top-k only, and GOLD's exact match needs its whole "
                                 "distribution over the shared ids: use cross_tokenizer.method: uld with offline")
            if self.offline is not None and xt.top_k is not None:
                raise ValueError("offline ULD compares the cache's top_k probabilities each side; drop "
                                 "cross_tokenizer.top_k (distill.top_k sets k)")
        if self.cross_tokenizer is not None and self.on_policy is not None and self.on_policy.source != "student":
            raise ValueError(f"on_policy.source: {self.on_policy.source} has the teacher pick tokens in its own "
                             "vocabulary; with cross_tokenizer use source: student")
        if self.chunk_backend == "liger":
            if self.chunk_tokens is None:
                raise ValueError("chunk_backend: liger computes the chunked loss: set chunk_tokens too")
            unsupported = [k for k, v in (("loss: " + self.loss, self.loss not in LIGER_BETA),
                                          ("ce_weight", self.ce_weight > 0), ("top_k", self.top_k is not None),
                                          ("offline", self.offline is not None), ("hidden_weight", self.hidden_weight > 0),
                                          ("cross_tokenizer", self.cross_tokenizer is not None)) if v]
            if unsupported:
                raise ValueError(f"chunk_backend: liger (Liger-Kernel's fused linear JSD) does not take {unsupported}; "
                                 "use chunk_backend: ours")
        if self.on_policy is not None and self.ce_weight > 0:
            raise ValueError("on_policy batches have no data continuations to score CE on: set ce_weight=0")
        return self


class DistillModule(nn.Module):
    """The student plus what KD trains beside it (projections to the teacher's width)."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList | None):
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.student(input_ids=input_ids, output_hidden_states=output_hidden_states)


def _inner(module: nn.Module) -> DistillModule:
    return getattr(module, "module", module)  # under a DeepSpeed engine


def draw(seed: int, step: int, micro: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step, micro batch): the same on every
    rank and after a resume."""
    h = hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()
    return int.from_bytes(h[:7], "big") / 2**56


def teacher_layer(student_layer: int, n_student: int, n_teacher: int, layer_map: list[int] | None) -> int:
    """Teacher hidden-state index matched to a student one (-1 = last: last)."""
    if student_layer < 0 or student_layer >= n_student - 1:
        return n_teacher - 1
    if layer_map is not None:
        return layer_map[student_layer]
    return round((student_layer + 1) * n_teacher / n_student) - 1  # proportional depth


@register(DistillStage)
class Distill(StageMethod):
    needs_teacher = True
    distills = True

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        student = configs.get("student")
        if cfg.hidden_weight > 0 and student is not None:
            n = student.num_hidden_layers
            bad = [l for l in cfg.hidden_layers if l >= n]
            if bad:
                raise CompressError(f"distill.hidden_layers has {bad} but the student has {n} layers (0..{n - 1}, "
                                    "or -1 for the last); fix the indices")
        if recipe.teacher.shard == "zero3" and cfg.offline is not None:
            raise CompressError("offline KD runs the teacher once before training; teacher.shard=zero3 is not needed "
                                "there: set teacher.shard=none")
        if cfg.chunk_backend == "liger" and recipe.extra_teachers:
            raise CompressError("chunk_backend: liger takes one teacher; drop extra_teachers or use chunk_backend: ours")
        if cfg.chunk_backend == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise CompressError("chunk_backend: liger needs the liger-kernel package: pip install liger-kernel==0.8.5 "
                                "(or use chunk_backend: ours)")
        if cfg.chunk_tokens is not None and recipe.train.zero_stage == 3:
            raise CompressError("distill.chunk_tokens needs the student's LM head whole on each rank, which ZeRO-3 "
                                "partitions: use train.zero_stage <= 2 or drop chunk_tokens")
        if cfg.on_policy is not None and cfg.on_policy.prompt_tokens >= recipe.data.block_size:
            raise CompressError(f"distill.on_policy.prompt_tokens={cfg.on_policy.prompt_tokens} leaves nothing to sample "
                                f"in blocks of data.block_size={recipe.data.block_size}; use fewer prompt tokens")

    def wrap(self, student: nn.Module) -> nn.Module:
        projections = None
        if self.cfg.hidden_weight > 0:
            d_s, d_t = student.config.hidden_size, self.ctx.teacher.config.hidden_size
            # learned projection only where widths differ; identity otherwise
            projections = nn.ModuleList(
                [nn.Linear(d_s, d_t, bias=False) if d_s != d_t else nn.Identity() for _ in self.cfg.hidden_layers]
            )
        # (weight, Teacher, offline cache or None): the recipe's teacher first, then extra_teachers
        w = self.cfg.kd_weight
        self.teachers = [[w * self.ctx.recipe.teacher.weight, self.ctx.teacher, None]]
        self.teachers += [[w * weight, t, None] for weight, t in self.ctx.extra_teachers]
        c = self.cfg
        self.terms = KDTerms(kind=c.loss, temperature=c.temperature, beta=c.beta, skew_alpha=c.skew_alpha,
                             top_k=c.top_k, ce_weight=c.ce_weight)
        return DistillModule(student, projections)

    def prepare(self, module: nn.Module, stage_dir: Path, steps: int) -> None:
        if self.cfg.offline is None:
            return
        ctx, tr = self.ctx, self.ctx.recipe.train
        gb = tr.micro_batch_size * tr.grad_accum * ctx.world
        seed = ctx.extra["stage_seed"]
        blocks = torch.cat([sample_indices(seed, s, len(ctx.data.train), gb) for s in range(steps)]).tolist()
        root = Path(self.cfg.offline.dir) if self.cfg.offline.dir else stage_dir / "teacher_topk"
        sources = [ctx.recipe.teacher.source] + [t.source for t in ctx.recipe.extra_teachers]
        align, key = None, [ctx.data.key]
        if self.cfg.cross_tokenizer is not None:  # the teacher's rows at the student's positions
            from compress.cross_tokenizer import align_batch

            align = functools.partial(align_batch, student_tok=ctx.tokenizer,
                                      teacher_tok=ctx.teacher_tokenizer or ctx.tokenizer)
            key.append(ctx.recipe.student.tokenizer)
        for i, entry in enumerate(self.teachers):
            entry[2] = precompute(
                entry[1], ctx.data, blocks, root if i == 0 else root / f"teacher{i}", k=self.cfg.top_k,
                temperature=self.cfg.temperature, key_parts=[sources[i], *key],
                shard_blocks=self.cfg.offline.shard_blocks, batch_size=tr.micro_batch_size, rank=ctx.rank,
                world=ctx.world, barrier=ctx.barrier, device=ctx.device, align=align,
            )

    # --- on-policy batches ---
    def _sampled(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        """(input ids with sampled continuations, (B, T) mask of the sampled positions, logs), or None
        when this micro batch stays off-policy."""
        op, ctx = self.cfg.on_policy, self.ctx
        if op is None or op.lmbda == 0 or draw(ctx.extra["stage_seed"], batch["step"], batch["micro"]) >= op.lmbda:
            return None
        x = batch["input_ids"]
        student = _inner(module).student
        vocab = min(student.config.vocab_size, ctx.teacher.config.vocab_size) if ctx.teacher_tokenizer is None \
            else student.config.vocab_size  # another tokenizer: the student samples from its own vocabulary
        g = torch.Generator(device=x.device).manual_seed(
            int(draw(ctx.extra["stage_seed"] + 1 + ctx.rank, batch["step"], batch["micro"]) * 2**62))
        P, logs = op.prompt_tokens, {"on_policy": torch.tensor(1.0)}
        kw = dict(temperature=op.temperature, top_p=op.top_p, generator=g, vocab_size=vocab)
        if op.source == "interleaved":
            seq, kept = interleaved_continuations(student, ctx.teacher.model, x[:, :P], x.shape[1] - P,
                                                  accept_top_k=op.accept_top_k, **kw)
            logs["student_kept"] = kept.float().mean()  # the share of the text that is the student's own
        else:
            seq = sample_continuations(student if op.source == "student" else ctx.teacher.model, x[:, :P],
                                       x.shape[1] - P, **kw)
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, P - 1:] = True  # logits at P-1 predict the first sampled token
        return seq, mask, logs

    def _cross_tokenizer_loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """ULD / GOLD on the positions where student and teacher tokens end at the same byte."""
        from compress.cross_tokenizer import align_batch, aligned_logits, gold_loss, uld_loss, uld_loss_topk, vocab_overlap

        cfg, ctx, x = self.cfg, self.ctx, batch["input_ids"]
        s_tok, t_tok = ctx.tokenizer, ctx.teacher_tokenizer or ctx.tokenizer
        if cfg.cross_tokenizer.method == "gold" and not hasattr(self, "overlap"):
            self.overlap = tuple(t.to(x.device) for t in vocab_overlap(s_tok, t_tok))
        sampled = self._sampled(module, batch)  # on-policy: the student's own continuation, as text for the teacher
        if sampled is not None:
            x = sampled[0]
        al = align_batch(x.cpu(), s_tok, t_tok)
        al = {k: v.to(x.device) for k, v in al.items()}
        if sampled is not None:  # only the pairs that predict sampled text
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(al["s_pos"])
            al["pair_mask"] &= sampled[1][rows, al["s_pos"]]
        xt = cfg.cross_tokenizer

        def pair_loss(zs, zt, cached=False):  # zt: the teacher's logits, or its cached top-k log-probs
            if cached:
                return uld_loss_topk(zs, zt, temperature=cfg.temperature) * cfg.temperature**2
            if xt.method == "uld":
                return uld_loss(zs, zt, temperature=cfg.temperature, top_k=xt.top_k) * cfg.temperature**2
            return gold_loss(zs, zt, self.overlap, temperature=cfg.temperature, top_k=xt.top_k) * cfg.temperature**2

        names = [f"kd{i if len(self.teachers) > 1 else ''}" for i in range(len(self.teachers))]
        logs = {"aligned_fraction": al["pair_mask"].sum().float().detach() / x.numel()}
        if cfg.on_policy is not None:
            logs |= sampled[2] if sampled is not None else {"on_policy": torch.tensor(0.0)}
        # an offline cache holds each teacher's rows at the student's positions: (B, T, k) log-probs
        cached = [None if c is None else c.get(batch["index"], x.device)[1] for _, _, c in self.teachers]
        want_hidden = cfg.hidden_weight > 0
        if cfg.chunk_tokens is not None:
            total, out, parts, t_first = self._cross_tokenizer_chunked(module, x, batch["labels"], al, pair_loss, cached,
                                                                       want_hidden)
            logs |= {k: v for k, v in zip(names + ["ce"], parts) if v is not None}
        else:
            out = module(input_ids=x, output_hidden_states=want_hidden)
            total, t_first = 0.0, None
            for i, (name, (weight, teacher, _), lp) in enumerate(zip(names, self.teachers, cached)):
                if lp is None:
                    t_out = teacher(al["teacher_ids"], hidden=want_hidden and i == 0)
                    t_first = t_out if i == 0 else t_first
                    term = pair_loss(*aligned_logits(out.logits, t_out.logits, al))
                else:
                    term = pair_loss(*aligned_logits(out.logits, lp, {**al, "t_pos": al["s_pos"]}), cached=True)
                logs[name] = term.detach()
                total = total + weight * term
            if cfg.ce_weight > 0:
                ce = ce_loss(out.logits, batch["labels"])
                total = total + cfg.ce_weight * ce
                logs["ce"] = ce.detach()
        if want_hidden:  # the two models' hidden states where their tokens end at the same byte
            mse = self._hidden_mse(module, out.hidden_states, t_first.hidden_states, aligned=al)
            total = total + cfg.hidden_weight * mse
            logs["hidden_mse"] = mse.detach()
        return with_model_losses(total, logs, out, module)

    def _cross_tokenizer_chunked(self, module: nn.Module, x: torch.Tensor, labels: torch.Tensor, al: dict, pair_loss,
                                 cached: list, want_hidden: bool = False):
        """The cross-tokenizer loss chunk by chunk over the student's flattened tokens: each chunk's
        aligned pairs get their teacher logits from the teachers' final hidden states (rows t_pos),
        or their cached top-k (rows s_pos), so neither side's (tokens × vocabulary) logits exist
        whole. Equals the unchunked loss. Returns (loss, student output, per-term sums, the first
        teacher's forward output, with its hidden states when ``want_hidden``)."""
        cfg, student = self.cfg, _inner(module).student
        keep = al["pair_mask"]
        b = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(al["s_pos"])
        flat_s = (b * x.shape[1] + al["s_pos"])[keep]  # increasing: rows in order, positions in order
        flat_t = (b * al["teacher_ids"].shape[1] + al["t_pos"])[keep]
        n_pairs = max(int(flat_s.numel()), 1)

        t_first = None

        def rows_of(i, teacher, lp):  # pairs lo:hi -> (teacher rows, cached?)
            nonlocal t_first
            if lp is not None:
                lp = lp.flatten(0, 1)
                return lambda lo, hi: (lp[flat_s[lo:hi]], True)
            t_out, hidden = teacher.final_hidden(al["teacher_ids"], hidden=want_hidden and i == 0)
            t_first = t_out if i == 0 else t_first
            hidden, head, config = hidden.flatten(0, 1), teacher.head, teacher.config

            def rows(lo, hi):
                with torch.no_grad():
                    return softcapped(head(hidden[flat_t[lo:hi]]), config), False
            return rows

        teachers = [(w, rows_of(i, t, lp)) for i, ((w, t, _), lp) in enumerate(zip(self.teachers, cached))]
        flat_labels = labels.flatten()
        n_labels = (flat_labels != -100).sum().clamp_min(1)
        sums = [torch.zeros((), device=x.device) for _ in range(len(teachers) + 1)]

        def fn(logits, rows):
            logits = softcapped(logits, student.config)
            lo, hi = (int(v) for v in torch.searchsorted(flat_s, torch.tensor([rows.start, rows.stop], device=x.device)))
            value = logits.sum() * 0  # a chunk with no pairs (and no CE) still returns a graph
            if hi > lo:
                zs = logits[flat_s[lo:hi] - rows.start]
                for i, (weight, rows_at) in enumerate(teachers):
                    term = pair_loss(zs, *rows_at(lo, hi)) * ((hi - lo) / n_pairs)
                    sums[i] += term.detach()
                    value = value + weight * term
            if cfg.ce_weight > 0:
                ce = F.cross_entropy(logits.float(), flat_labels[rows], ignore_index=-100, reduction="sum") / n_labels
                sums[-1] += ce.detach()
                value = value + cfg.ce_weight * ce
            return value

        with head_input_captured(student) as box:
            out = module(input_ids=x, output_hidden_states=want_hidden)
        total = chunked_head_loss(box["hidden"], student.get_output_embeddings(), fn, cfg.chunk_tokens)
        return total, out, [*sums[:-1], sums[-1] if cfg.ce_weight > 0 else None], t_first

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.cfg.cross_tokenizer is not None:
            return self._cross_tokenizer_loss(module, batch)
        cfg, x, labels, mask = self.cfg, batch["input_ids"], batch["labels"], None
        sampled = self._sampled(module, batch)
        logs = {}
        if sampled is not None:
            x, mask, logs = sampled
        elif cfg.on_policy is not None:
            logs["on_policy"] = torch.tensor(0.0)
        want_hidden = cfg.hidden_weight > 0
        flat_mask = None if mask is None else mask.flatten()
        n_mask = torch.tensor(x.numel(), device=x.device) if mask is None else mask.sum()
        flat_labels = labels.flatten() if cfg.ce_weight > 0 else None
        n_labels = None if flat_labels is None else (flat_labels != -100).sum()
        self.terms.parts = {}
        chunked = cfg.chunk_tokens is not None
        if chunked and cfg.chunk_backend == "liger":  # the teacher's hidden states are read inside
            student = _inner(module).student
            with head_input_captured(student) as box:
                out = module(input_ids=x)
            total = self._liger_loss(box["hidden"], student, x, flat_mask)
            logs["kd"] = total.detach()
            return with_model_losses(total, logs, out, module)
        views, t_first = self._teacher_views(x, batch, want_hidden, chunked)
        kw = dict(mask=flat_mask, labels=flat_labels, n_mask=n_mask, n_labels=n_labels)
        if chunked:
            student = _inner(module).student
            with head_input_captured(student) as box:
                out = module(input_ids=x, output_hidden_states=want_hidden)
            total = chunked_head_loss(box["hidden"], student.get_output_embeddings(),
                                      lambda logits, rows: self.terms(softcapped(logits, student.config),
                                                                      [(w, v(rows)) for w, v in views], rows, **kw),
                                      cfg.chunk_tokens)
        else:
            out = module(input_ids=x, output_hidden_states=want_hidden)
            total = self.terms(out.logits.flatten(0, 1), [(w, v(slice(None))) for w, v in views], **kw)
        logs.update(self.terms.parts)
        if want_hidden:
            mse = self._hidden_mse(module, out.hidden_states, t_first.hidden_states, mask=mask)
            total = total + cfg.hidden_weight * mse
            logs["hidden_mse"] = mse.detach()
        return with_model_losses(total, logs, out, module)

    def _hidden_mse(self, module: nn.Module, s_states, t_states, mask=None, aligned: dict | None = None) -> torch.Tensor:
        """Hidden-state MSE, averaged over ``hidden_layers``: each student layer against its teacher
        layer (``teacher_layer``), through the learned projections. ``aligned`` (an ``align_batch``
        result) compares only the paired positions, for a student with another tokenizer."""
        from compress.cross_tokenizer import aligned_logits

        proj_list = _inner(module).projections
        n_s, n_t = len(s_states) - 1, len(t_states) - 1
        terms = []
        for l, proj in zip(self.cfg.hidden_layers, proj_list):
            hs = s_states[l + 1 if l >= 0 else n_s]
            ht = t_states[teacher_layer(l, n_s, n_t, self.ctx.layer_map) + 1].to(hs.dtype)
            if aligned is not None:  # (1, pairs, D) each, every row counted (none: 0, still in the graph)
                hs, ht = (h[None] for h in aligned_logits(hs, ht, aligned))
                mask = torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device)
            terms.append(hidden_mse(hs, ht, proj=proj, mask=mask))
        return sum(terms) / len(terms)

    def _liger_loss(self, hidden: torch.Tensor, student: nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
        """KD through Liger-Kernel's fused linear JSD (Triton): student and teacher final hidden
        states and heads in, the loss out, logits only a chunk at a time inside its kernel. The
        same value as ours (``kd_loss``: masked mean times temperature**2); tested against it."""
        from liger_kernel.transformers import LigerFusedLinearJSD

        cfg = self.cfg
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise CompressError("chunk_backend: liger runs Liger-Kernel's Triton kernels, which need a CUDA GPU here; "
                                "use chunk_backend: ours on CPU")
        weight, teacher, _ = self.teachers[0]
        heads = [student.get_output_embeddings(), teacher.head]
        configs = [student.config, teacher.config]
        if any(type(h) is not nn.Linear or h.bias is not None for h in heads) or \
                any(getattr(c, "final_logit_softcapping", None) for c in configs):
            raise CompressError("chunk_backend: liger needs plain bias-free LM heads and no logit soft-capping; this "
                                "model has another head (quantized, LoRA, biased or soft-capped): use chunk_backend: ours")
        V = min(h.weight.shape[0] for h in heads)  # vocabularies padded to different sizes
        _, t_hidden = teacher.final_hidden(x)
        labels = None if mask is None else torch.where(mask, 0, -100)  # Liger skips the -100 positions
        fn = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[cfg.loss](cfg.beta), temperature=cfg.temperature)
        d = hidden.shape[-1]
        loss = fn(hidden.reshape(-1, d), heads[0].weight[:V], t_hidden.reshape(-1, t_hidden.shape[-1]).to(hidden.dtype),
                  heads[1].weight[:V].to(hidden.dtype), labels)
        return weight * loss * cfg.temperature**2

    def _teacher_views(self, x: torch.Tensor, batch: dict, want_hidden: bool, chunked: bool):
        """Per teacher (weight, rows -> kd_per_token's teacher kwargs for those flattened tokens), and the
        first teacher's forward output (for hidden-state MSE)."""
        views, t_first = [], None
        for i, (weight, teacher, cache) in enumerate(self.teachers):
            hidden = want_hidden and i == 0
            if cache is not None:
                ids, lp = (a.flatten(0, 1) for a in cache.get(batch["index"], x.device))
                views.append((weight, lambda rows, ids=ids, lp=lp, V=cache.vocab_size:
                              {"teacher_topk": (ids[rows], lp[rows]), "teacher_vocab": V}))
            elif chunked:
                t_out, h = teacher.final_hidden(x, hidden=hidden)
                h = h.flatten(0, 1)

                def view(rows, h=h, head=teacher.head, config=teacher.config):
                    with torch.no_grad():
                        return {"teacher_logits": softcapped(head(h[rows]), config)}
                views.append((weight, view))
            else:
                t_out = teacher(x, hidden=hidden)
                logits = t_out.logits.flatten(0, 1)
                views.append((weight, lambda rows, logits=logits: {"teacher_logits": logits[rows]}))
            if i == 0:
                t_first = None if cache is not None else t_out
        return views, t_first

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.student
