"""Speculative decoding: the compressed model drafts, its teacher verifies.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", and Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling". Each round the
draft proposes k tokens one at a time; the target scores all of them in ONE forward pass and
keeps the longest prefix it agrees with, plus one token of its own. Both KV caches are cropped
back to the accepted prefix. Greedy output equals the target's own greedy output token for
token; sampled output is distributed exactly as the target's samples.

Usage:
    res = speculative_generate(teacher, student, input_ids, max_new_tokens=128, k=4)
    res.tokens, res.acceptance_rate, res.tokens_per_target_pass
    speculative_generate(..., graphs=True)   # static KV caches, decode steps as CUDA graphs (served)

Cache invariant (both models, between rounds): the cache holds a prefix of `seq` (prompt + accepted
tokens), never its last token, so each forward feeds `seq[cache_len:]` (plus the drafts) and the
last logits rows are the predictions we need. The first target pass is therefore also the prompt
prefill, and every target pass is a verify pass.

The models run through ``eval.decoders`` (a dynamic cache and eager forwards, or a static cache
and CUDA graphs), which own the caches and their roll-back.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch

from compress.errors import CompressError
from eval.decoders import decoder

# Draft and target may differ only by embedding padding rows (e.g. vocab rounded up to 64 or 128).
VOCAB_PADDING_SLACK = 256


@dataclass
class SpecResult:
    """One prompt's speculative decoding: the new tokens and what it cost."""

    tokens: torch.Tensor  # (N,) new token ids, prompt excluded
    target_passes: int  # target forward calls; the first one also prefills the prompt
    draft_passes: int
    proposed: int  # draft tokens sent to the target for verification
    accepted: int  # of those, the ones the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        return self.tokens.numel() / self.target_passes


def speculative_generate(target, draft, input_ids: torch.Tensor, *, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None, graphs: bool = False) -> SpecResult:
    """Speculative decoding of one prompt (Leviathan et al. 2023; Chen et al. 2023).

    Both models score only the shared ids [:min(V_draft, V_target)] (padding rows never win).
    temperature == 0: greedy, identical to the target's greedy decoding. temperature > 0: rejection
    sampling, distributed as softmax(target_logits / temperature). `generator` (on the target's
    device) makes the sampling reproducible. Stops after max_new_tokens or at eos_token_id.
    ``graphs``: both models on static KV caches, their decode steps replayed as CUDA graphs on
    CUDA (``eval.decoders``), as served; the tokens are the same.
        res = speculative_generate(teacher, student, ids, max_new_tokens=64, k=4)
    """
    _check_prompt(input_ids)
    _check_lengths(k, max_new_tokens)
    if temperature < 0:
        raise CompressError(f"temperature={temperature}: pass 0 for greedy or a positive value to sample")
    vocab = _shared_vocab(target, draft)
    max_len = input_ids.shape[1] + max_new_tokens + k + 1
    with torch.inference_mode():
        # a model drafting for itself needs a second cache of its own
        t_dec, d_dec = decoder(target, max_len, graphs), decoder(draft, max_len, graphs, private=draft is target)
        return _speculate(t_dec, d_dec, input_ids[0].to(target.device), max_new_tokens, k,
                          temperature, generator, eos_token_id, vocab)


def _speculate(target, draft, prompt, max_new_tokens, k, temperature, generator, eos_token_id, V):
    """target, draft: decoders (``eval.decoders``) with empty caches."""
    seq = prompt  # (T + generated,) everything accepted so far
    target_passes = draft_passes = proposed = accepted = 0
    while True:
        budget = max_new_tokens - (seq.numel() - prompt.numel())
        # Each round yields at most k_round + 1 tokens, so no round overshoots max_new_tokens.
        k_round = min(k, budget - 1)

        # 1. The draft proposes k_round tokens, one forward each.
        drafted = seq.new_empty(0)  # (k_round,)
        q_rows = []  # draft probabilities, one (V,) row per drafted token, when sampling
        for _ in range(k_round):
            feed = torch.cat([seq, drafted])[draft.length:]
            logits = draft.forward(feed, keep=1)[-1, :V].to(seq.device)
            draft_passes += 1
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                q_rows.append(torch.softmax(logits / temperature, dim=-1))
                token = torch.multinomial(q_rows[-1], 1, generator=generator)
            drafted = torch.cat([drafted, token])

        # 2. The target scores seq's last token and every draft in one pass: row i predicts the
        # token after drafted[:i], the last row is the bonus position.
        feed = torch.cat([seq, drafted])[target.length:]
        target_logits = target.forward(feed, keep=k_round + 1)[:, :V]  # (k_round + 1, V)
        target_passes += 1
        if target_passes == 1:  # some layers (linear attention) know only after prefill if they can
            target.check_croppable()
            draft.check_croppable()

        # 3. Keep the longest agreeing prefix plus one target token.
        if temperature == 0:
            n_ok, extra = _accept_greedy(drafted, target_logits)
        else:
            p = torch.softmax(target_logits / temperature, dim=-1)
            n_ok, extra = _accept_sampled(drafted, torch.stack(q_rows) if q_rows else None, p, generator)
        proposed += k_round
        accepted += n_ok
        new = torch.cat([drafted[:n_ok], extra])

        # 4. Roll both caches back to the new seq minus its last token.
        kept = seq.numel() + n_ok
        target.crop(kept)
        draft.crop(min(draft.length, kept))

        if eos_token_id is not None and (new == eos_token_id).any():
            stop = int((new == eos_token_id).nonzero()[0]) + 1
            seq = torch.cat([seq, new[:stop]])
            break
        seq = torch.cat([seq, new])
        if seq.numel() - prompt.numel() >= max_new_tokens:
            break
    return SpecResult(tokens=seq[prompt.numel():].cpu(), target_passes=target_passes,
                      draft_passes=draft_passes, proposed=proposed, accepted=accepted)


def _accept_greedy(drafted, target_logits):
    """Drafts equal to the target's argmax are kept; the target's token follows them."""
    choice = target_logits.argmax(-1)  # (k + 1,)
    n_ok = int((drafted != choice[:-1]).int().cumsum(0).eq(0).sum())  # length of the agreeing prefix
    return n_ok, choice[n_ok:n_ok + 1]


def _accept_sampled(drafted, q, p, generator):
    """Leviathan et al. Algorithm 1: keep x_i with prob min(1, p_i(x)/q_i(x)); on the first
    rejection sample norm(max(0, p_i - q_i)); if all are kept, sample the bonus from p_k."""
    k = drafted.numel()
    if k:
        rows = torch.arange(k, device=p.device)
        ratio = p[rows, drafted] / q[rows, drafted]  # q > 0: each draft was sampled from q
        rejected = torch.rand(k, generator=generator, device=p.device) >= ratio
        n_ok = int(rejected.int().cumsum(0).eq(0).sum())
    else:
        n_ok = 0
    if n_ok == k:
        return k, torch.multinomial(p[k], 1, generator=generator)
    residual = (p[n_ok] - q[n_ok]).clamp_min(0)
    if residual.sum() <= 0:  # p == q up to rounding: the rejection was a float artefact
        residual = p[n_ok]
    return n_ok, torch.multinomial(residual / residual.sum(), 1, generator=generator)


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, graphs: bool = False) -> torch.Tensor:
    """Plain KV-cache greedy decoding, one forward per token: the baseline and the reference.
        tokens = greedy_generate(teacher, ids, 64)  # (N,) new tokens
    ``graphs``: a static cache, each step a CUDA graph replay on CUDA (``eval.decoders``).
    """
    _check_prompt(input_ids)
    _check_lengths(1, max_new_tokens)
    _check_eval(model, "model")
    with torch.inference_mode():
        dec = decoder(model, input_ids.shape[1] + max_new_tokens, graphs)
        feed = input_ids[0].to(model.device)
        out = []
        for _ in range(max_new_tokens):
            feed = dec.forward(feed, keep=1)[-1].argmax(-1, keepdim=True)  # (1,)
            out.append(feed)
            if eos_token_id is not None and int(feed) == eos_token_id:
                break
        return torch.cat(out).cpu()


def serve_prompts(target, draft, prompts: list[torch.Tensor], *, k: int, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0, baseline: dict | None = None,
                  deadline: float | None = None, hopeless_below: float | None = None, min_proposed: int = 32,
                  outputs: list | None = None, progress=None, graphs: bool = False) -> dict:
    """Serve prompts one after another, target alone (greedy) vs speculative, and time both.
    Returns k, n_prompts (served), new_tokens, acceptance_rate, mean_accepted_per_pass,
    target_tokens_per_s, spec_tokens_per_s, speedup, exact_match (None when sampling),
    first_divergence, dtype, stopped (why it stopped early, else None) and per_prompt ([accepted,
    proposed] for each prompt served, in order: two drafts compare prompt by prompt).
        stats = serve_prompts(teacher, student, [ids1, ids2], k=4, max_new_tokens=128)

    Early stops (each prompt runs whole; at least one always runs): past ``deadline``
    (``time.monotonic()``), or once ``min_proposed`` drafts were verified and the acceptance rate
    is below ``hopeless_below``. ``baseline`` (a dict shared across calls) keeps each prompt's
    greedy reference and its time, so several k reuse one baseline run. ``outputs`` receives
    each prompt's new tokens; ``progress`` (a tqdm bar) advances once per prompt. ``graphs``: both
    sides (the target alone too) on static caches and CUDA graphs (``eval.decoders``), as served.
    """
    if not prompts:
        raise CompressError("serve_prompts got no prompts; pass a non-empty list of (T,) or (1, T) id tensors")
    prompts = [p.reshape(1, -1) if isinstance(p, torch.Tensor) and p.dim() == 1 else p for p in prompts]
    for p in prompts:
        _check_prompt(p)
    _check_lengths(k, max_new_tokens)
    device = target.device
    baseline = {} if baseline is None else baseline
    generator = torch.Generator(device=device).manual_seed(seed)
    spec = dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, graphs=graphs)
    # Warm-up outside the clock: first calls pay for allocator and kernel set-up.
    if not baseline:
        greedy_generate(target, prompts[0], 2, graphs=graphs)
    speculative_generate(target, draft, prompts[0], **{**spec, "max_new_tokens": 2})

    base_time = spec_time = 0.0
    base_tokens = 0
    results, exact, diverged_at, stopped = [], True, None, None
    for i, p in enumerate(prompts):
        proposed = sum(r.proposed for r in results)
        rate = sum(r.accepted for r in results) / proposed if proposed else 1.0
        if results and deadline is not None and time.monotonic() > deadline:
            stopped = f"time budget spent after {len(results)} of {len(prompts)} prompts"
        elif results and hopeless_below is not None and proposed >= min_proposed and rate < hopeless_below:
            stopped = f"hopeless: acceptance {rate:.3f} < {hopeless_below} after {len(results)} of {len(prompts)} prompts"
        if stopped:
            break
        reference, seconds = _baseline(target, p, i, baseline, max_new_tokens, graphs)
        base_time += seconds
        base_tokens += reference.numel()
        start = _now(device)
        res = speculative_generate(target, draft, p, **spec)
        spec_time += _now(device) - start
        results.append(res)
        if outputs is not None:
            outputs.append(res.tokens)
        if progress is not None:
            progress.update(1)
        if not torch.equal(res.tokens, reference):
            exact = False
            n = min(len(res.tokens), len(reference))
            where = (res.tokens[:n] != reference[:n]).nonzero()
            at = int(where[0]) if len(where) else n
            diverged_at = at if diverged_at is None else min(diverged_at, at)
    if progress is not None and stopped:
        progress.update(len(prompts) - len(results))
    new_tokens = sum(r.tokens.numel() for r in results)
    proposed = sum(r.proposed for r in results)
    accepted = sum(r.accepted for r in results)
    target_tps, spec_tps = base_tokens / base_time, new_tokens / spec_time
    return {
        "k": k,
        "n_prompts": len(results),
        "new_tokens": new_tokens,
        "acceptance_rate": accepted / proposed if proposed else float("nan"),
        "mean_accepted_per_pass": accepted / sum(r.target_passes for r in results),
        "target_tokens_per_s": target_tps,
        "spec_tokens_per_s": spec_tps,
        "speedup": spec_tps / target_tps,
        "exact_match": exact if temperature == 0 else None,
        "first_divergence": diverged_at if temperature == 0 else None,  # new-token index, over all prompts
        "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
        "stopped": stopped,
        "per_prompt": [[r.accepted, r.proposed] for r in results],
    }


def assisted_generate_hf(target, draft, input_ids: torch.Tensor, max_new_tokens: int, *, k: int = 4,
                         eos_token_id: int | None = None, tokenizers: tuple | None = None,
                         passes: list | None = None) -> torch.Tensor:
    """transformers' own assisted generation, greedy, with exactly k draft tokens per round, for
    side-by-side comparison with speculative_generate. Returns the (N,) new tokens.
        hf_tokens = assisted_generate_hf(teacher, student, ids, 64, k=4)

    ``tokenizers=(target_tok, draft_tok)``: a draft with its own tokenizer (transformers' universal
    assisted generation: each round's draft text is re-tokenized for the target). ``passes``
    receives the number of target forward passes (verification rounds).
    """
    _check_prompt(input_ids)
    _check_lengths(k, max_new_tokens)
    v_target, v_draft = _vocab_size(target), _vocab_size(draft)
    if v_target != v_draft and tokenizers is None:
        raise CompressError(f"transformers' assisted generation needs equal vocab sizes (target {v_target}, "
                            f"draft {v_draft}); use speculative_generate, which handles padding rows")
    _check_eval(target, "target")
    _check_eval(draft, "draft")
    # generate() fills unset options from each model's generation_config, and the assistant reads
    # num_assistant_tokens (default 20, possibly "heuristic") and a confidence threshold (0.4: stop
    # drafting early) from ITS generation_config. Pin them on copies, and restore the originals.
    target_cfg = copy.deepcopy(target.generation_config)
    draft_cfg = copy.deepcopy(draft.generation_config)
    for cfg in (target_cfg, draft_cfg):
        cfg.eos_token_id = eos_token_id
        cfg.num_assistant_tokens = k
        cfg.num_assistant_tokens_schedule = "constant"
        cfg.assistant_confidence_threshold = 0.0  # 0 disables the early stop
    saved = target.generation_config, draft.generation_config
    count = target.register_forward_hook(lambda *_: calls.append(1))
    calls: list = []
    # transformers refuses assistant_tokenizer when the two are the same: then it is plain assisted generation
    differ = tokenizers is not None and tokenizers[0].get_vocab() != tokenizers[1].get_vocab()
    extra = {"tokenizer": tokenizers[0], "assistant_tokenizer": tokenizers[1]} if differ else {}
    try:
        target.generation_config, draft.generation_config = target_cfg, draft_cfg
        ids = input_ids.to(target.device)
        # assisted generation warns on every call about its own internal generate() arguments
        with torch.inference_mode(), _quiet_transformers():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft,
                                  do_sample=False, max_new_tokens=max_new_tokens, **extra)
    finally:
        count.remove()
        draft.generation_config = saved[1]
        target.generation_config = saved[0]
    if passes is not None:
        passes.append(len(calls))
    return out[0, ids.shape[1]:].cpu()


def serve_prompts_across_tokenizers(target, draft, tokenizers: tuple, prompts: list[torch.Tensor], *, k: int,
                                    max_new_tokens: int, baseline: dict | None = None,
                                    deadline: float | None = None) -> dict:
    """A draft with its own tokenizer, served greedily by transformers' universal assisted
    generation against the target alone (``prompts`` in the target's ids). The draft's tokens are
    not the target's, so there is no per-token acceptance rate: the row gives the target's tokens
    per verification pass (1 = no help) and the speedup, and checks the output equals the
    target's own greedy output."""
    if not prompts:
        raise CompressError("serve_prompts_across_tokenizers got no prompts; pass a non-empty list of (1, T) id tensors")
    _check_lengths(k, max_new_tokens)
    device, baseline = target.device, {} if baseline is None else baseline
    if not baseline:
        greedy_generate(target, prompts[0], 2)  # warm-up outside the clock
    assisted_generate_hf(target, draft, prompts[0], 2, k=k, tokenizers=tokenizers)
    base_time = spec_time = 0.0
    base_tokens = new_tokens = 0
    passes: list[int] = []
    exact, stopped = True, None
    for i, p in enumerate(prompts):
        if passes and deadline is not None and time.monotonic() > deadline:
            stopped = f"time budget spent after {len(passes)} of {len(prompts)} prompts"
            break
        reference, seconds = _baseline(target, p, i, baseline, max_new_tokens)
        base_time += seconds
        base_tokens += reference.numel()
        start = _now(device)
        out = assisted_generate_hf(target, draft, p, max_new_tokens, k=k, tokenizers=tokenizers, passes=passes)
        spec_time += _now(device) - start
        new_tokens += out.numel()
        exact = exact and torch.equal(out, reference)
    target_tps, spec_tps = base_tokens / base_time, new_tokens / spec_time
    return {"k": k, "n_prompts": len(passes), "new_tokens": new_tokens,
            "target_tokens_per_pass": new_tokens / sum(passes), "target_tokens_per_s": target_tps,
            "spec_tokens_per_s": spec_tps, "speedup": spec_tps / target_tps, "exact_match": exact,
            "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
            "method": "transformers universal assisted generation (draft text re-tokenized)", "stopped": stopped}


def _baseline(target, prompt: torch.Tensor, i: int, baseline: dict, max_new_tokens: int,
              graphs: bool = False) -> tuple[torch.Tensor, float]:
    """Prompt ``i``'s greedy reference from the target alone and its time, run once and kept in
    ``baseline`` (shared by every k and both serving paths; one per ``graphs`` setting)."""
    if i not in baseline:
        start = _now(target.device)
        tokens = greedy_generate(target, prompt, max_new_tokens, graphs=graphs)
        baseline[i] = (tokens, _now(target.device) - start)
    return baseline[i]


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _vocab_size(model) -> int:
    return model.config.get_text_config().vocab_size


def _shared_vocab(target, draft) -> int:
    _check_eval(target, "target")
    _check_eval(draft, "draft")
    v_target, v_draft = _vocab_size(target), _vocab_size(draft)
    if abs(v_target - v_draft) > VOCAB_PADDING_SLACK:
        raise CompressError(f"draft vocab {v_draft} and target vocab {v_target} differ by more than "
                            f"{VOCAB_PADDING_SLACK} padding rows; the draft must share the target's tokenizer")
    return min(v_target, v_draft)


def _check_prompt(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise CompressError(f"input_ids is {what}; pass token ids as an integer tensor of shape (1, T)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise CompressError(f"input_ids has shape {tuple(input_ids.shape)}; pass one prompt of shape (1, T), T >= 1")


def _check_lengths(k: int, max_new_tokens: int) -> None:
    if k < 1:
        raise CompressError(f"k={k}: the draft must propose at least one token per round; pass k >= 1")
    if max_new_tokens < 1:
        raise CompressError(f"max_new_tokens={max_new_tokens}: pass max_new_tokens >= 1")


def _check_eval(model, name: str) -> None:
    if model.training:
        raise CompressError(f"the {name} model is in training mode; call .eval() on it before decoding")


def _now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
