"""How the decoding loops (``eval.speculative``: greedy and speculative) run a model, one prompt at
batch 1: feed n new token ids after what the KV cache holds, get the last rows of logits, roll the
cache back after a rejected draft.

    EagerDecoder(model)            a DynamicCache, one eager forward a call: any model, any device.
    GraphDecoder(model, max_len)   a StaticCache of max_len tokens, CUDA graphs for short feeds on
                                   CUDA (``compress.sampling``, which the on-policy sampler shares):
                                   a decode step costs the GPU's time, not Python's, as a server's
                                   does (vLLM captures its decode steps the same way), and what a
                                   kernel's speed shows up in at batch 1.

Both: ``forward(ids (n,), keep) -> (keep, V)`` fp32 logits, ``length`` (tokens cached), ``crop(n)``
(keep the first n). ``decoder(model, max_len, graphs)`` hands out one GraphDecoder per model and
reuses it (and its graphs) across prompts while max_len fits.

transformers 5.24 notes: the cache argument is named ``cache`` (``past_key_values`` is a deprecated
alias) and ``Cache.crop(n)`` takes a NEGATIVE n, the number of tokens to drop.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache

from compress.errors import CompressError
from compress.sampling import (GRAPH_MAX, GraphDecoder, check_cache_argument, kept_decoder,  # noqa: F401  (re-exported)
                               serves_graphs)

_graph_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class EagerDecoder:
    """A DynamicCache and one eager forward a call. With the config, sliding-window layers are built
    up front; past recording keeps their evicted states until the next crop, so a rejected draft
    can be rolled back."""

    def __init__(self, model):
        check_cache_argument()
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cache.activate_past_recording()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        out = self.model(input_ids=ids[None].to(self.model.device), cache=self.cache, use_cache=True,
                         logits_to_keep=keep)
        return out.logits[0].float()

    def crop(self, n: int) -> None:
        self.cache.crop(-(self.length - n))  # crop(-0) still trims sliding-window layers to their window

    def check_croppable(self) -> None:
        """Some layers (linear attention) only know after the first forward whether they can roll back."""
        if not self.cache.is_croppable:
            raise CompressError(f"{type(self.model).__name__}'s KV cache cannot be rolled back after a rejected "
                                "draft; use models with attention (full or sliding-window) KV caches")


def graph_decoder(model):
    """The GraphDecoder this model serves with (None before its first graphs=True call): its
    ``graph_error`` says why a capture failed, ``graphs`` which feed lengths were captured."""
    return _graph_decoders.get(model)


def decoder(model, max_len: int, graphs: bool, private: bool = False):
    """An EagerDecoder, or this model's GraphDecoder emptied for a new prompt (a new one, its length
    rounded up to a multiple of 256, when max_len outgrows it). ``private``: a GraphDecoder of its
    own, not kept (a model that drafts for itself needs two caches)."""
    if not graphs:
        return EagerDecoder(model)
    if private:
        return GraphDecoder(model, max_len)
    return kept_decoder(_graph_decoders, model, model, max_len, 256)
