"""Batched sampling with a KV cache: continuations of equal-length prompts, for on-policy KD.

    seqs = sample_continuations(student, prompts, new_tokens=96, temperature=1.0, top_p=0.95, generator=g)

Every row gets exactly ``new_tokens`` tokens (no early stop at EOS), so a batch stays (B, P + n)
without padding, and ranks that each sample their own rows run the same number of forwards (a
ZeRO-3 model gathers its layers in lockstep). ``temperature == 0`` is greedy. The model is put in
eval mode for the sampling and restored after.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers import DynamicCache

from compress.errors import CompressError


@functools.cache
def check_cache_argument() -> None:
    """Our decoding loops pass the KV cache as ``cache=`` (transformers 5.24's name). Earlier
    releases (5.17, on the lent GPU machines' image) call it ``past_key_values`` and swallow an
    unknown keyword, so the model would decode each step without its context: refuse instead."""
    import transformers

    if "cache" not in inspect.signature(transformers.LlamaModel.forward).parameters:
        raise CompressError(f"transformers {transformers.__version__} names the KV cache argument past_key_values; "
                            "this project passes cache= (transformers 5.24): pip install -r requirements.txt")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of ids, most probable first,
    whose probability reaches ``top_p``; the rest get -inf. (B, V) -> (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each id: the first id is always kept
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         vocab_size: int | None = None) -> torch.Tensor:
    """(B, P) prompts -> (B, P + new_tokens): each row continued by ``model``'s own samples.

    ``vocab_size`` restricts sampling to ids [:vocab_size] (a student's embedding padding rows
    must never be drawn); default the model config's.
    """
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise CompressError(f"prompts must be (B, P) with P >= 1 token, got {tuple(prompts.shape)}")
    if new_tokens < 1:
        raise CompressError(f"new_tokens={new_tokens}: sample at least 1 token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise CompressError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
    check_cache_argument()
    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.config)
        seq, feed = prompts, prompts
        for _ in range(new_tokens):
            out = model(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :vocab_size].float()  # (B, V)
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                probs = top_p_filter(logits / temperature, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator)
            seq = torch.cat([seq, token], dim=1)
            feed = token
        return seq
    finally:
        model.train(was_training)
