"""How the decoding loops (``eval.speculative``: greedy and speculative) run a model, one prompt at
batch 1: feed n new token ids after what the KV cache holds, get the last rows of logits, roll the
cache back after a rejected draft.

    EagerDecoder(model)            a DynamicCache, one eager forward a call: any model, any device.
    GraphDecoder(model, max_len)   a StaticCache of max_len tokens. On CUDA a call of n <= GRAPH_MAX
                                   new tokens replays a CUDA graph captured for that n (the first
                                   call of each n captures it), so a decode step costs the GPU's
                                   time, not Python's: what a server does (vLLM captures its decode
                                   steps the same way), and what a kernel's speed shows up in at
                                   batch 1. Longer feeds (the prompt's prefill) and every call off
                                   CUDA run the same static-cache forward eagerly, so the CPU tests
                                   check the graph path's positions, mask and roll-back.

Both: ``forward(ids (n,), keep) -> (keep, V)`` fp32 logits, ``length`` (tokens cached), ``crop(n)``
(keep the first n). ``decoder(model, max_len, graphs)`` hands out one GraphDecoder per model and
reuses it (and its graphs) across prompts while max_len fits.

The graph path reads every position from the device: positions and the causal mask come from the
cache's own length tensor (advanced inside the graph by the cache update), so a replay needs no
host value; the mask is passed as a 4-D additive mask over the whole static cache, which also
keeps transformers' mask helpers (they compare the cache offset on the host) out of the capture.
transformers 5.24 notes: the cache argument is named ``cache`` (``past_key_values`` is a deprecated
alias) and ``Cache.crop(n)`` takes a NEGATIVE n, the number of tokens to drop.
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from compress.errors import CompressError
from compress.sampling import check_cache_argument

log = logging.getLogger("eval.decoders")
GRAPH_MAX = 16  # feeds up to this many tokens are captured (decode steps, k + 1 verify passes)
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


class GraphDecoder:
    """A StaticCache of ``max_len`` tokens; on CUDA, feeds of n <= GRAPH_MAX tokens replay a graph."""

    def __init__(self, model, max_len: int):
        check_cache_argument()
        self._model = weakref.ref(model)  # the decoder is kept per model (weakly): no cycle through it
        self.max_len, self.length = max_len, 0
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if not _full_attention(self.cache):
            kinds = sorted({type(layer).__name__ for layer in self.cache.layers})
            raise CompressError(f"graphs=True serves full-attention models only ({type(model).__name__} has cache "
                                f"layers {kinds}); pass graphs=False")
        self.device = model.device
        self.graphs: dict[int, tuple] = {}  # n -> (graph, ids buffer, logits buffer)
        self.pool = None
        self.graph_error: str | None = None  # why a capture failed: then every call runs eagerly

    @property
    def model(self):
        return self._model()

    def forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        n = ids.numel()
        if self.length + n > self.max_len:
            raise CompressError(f"the static KV cache holds {self.max_len} tokens; {self.length} + {n} do not fit "
                                "(pass a larger max_len)")
        ids = ids.to(self.device)
        graphed = self.device.type == "cuda" and n <= GRAPH_MAX and self.length > 0 and self.graph_error is None
        if graphed and n not in self.graphs:  # (the first call sizes the cache, eagerly)
            try:
                self._capture(n)
            except RuntimeError as e:  # something in the forward syncs with the host: serve eagerly, say why
                self.graph_error = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
                graphed = False
        if graphed:
            graph, ids_buffer, logits = self.graphs[n]
            ids_buffer.copy_(ids[None])
            graph.replay()
        else:
            logits = self._step(ids[None], n)
        self.length += n
        return logits[0, -keep:].float().clone()

    def crop(self, n: int) -> None:
        if n < self.length:
            with torch.inference_mode():  # the cache's tensors were made under it
                self.cache.crop(-(self.length - n))
            self.length = n

    def check_croppable(self) -> None:
        """A static cache always rolls back (checked when it was built)."""

    def _step(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """The forward of n new tokens (1, n) at the cache's own (device) length: positions and a
        4-D additive causal mask over the whole static cache (stale entries past the length masked)."""
        start = self.cache.get_seq_length()  # a tensor once the cache is allocated, 0 before
        positions = torch.arange(n, device=self.device) + start  # (n,)
        keys = torch.arange(self.max_len, device=self.device)
        mask = torch.zeros(n, self.max_len, dtype=self.model.dtype, device=self.device)
        mask.masked_fill_(keys[None, :] > positions[:, None], torch.finfo(mask.dtype).min)
        out = self.model(input_ids=ids, attention_mask=mask[None, None], position_ids=positions[None],
                         cache=self.cache, use_cache=True, logits_to_keep=n)
        return out.logits

    def _capture(self, n: int) -> None:
        """Capture the forward of n tokens at the current length. Two warm-up passes first, on a side
        stream as CUDA graphs need (they also autotune any Triton kernel for these shapes); they write
        K/V past the length, which the mask hides and later steps overwrite, and are rolled back."""
        ids_buffer = torch.zeros(1, n, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(ids_buffer, n)
                self.cache.crop(-n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(ids_buffer, n)
        self.graphs[n] = (graph, ids_buffer, logits)


def serves_graphs(model) -> bool:
    """Whether ``graphs=True`` would capture this model's decode steps: a CUDA model whose KV cache is
    all full attention (what GraphDecoder takes)."""
    return model.device.type == "cuda" and _full_attention(StaticCache(config=model.config, max_cache_len=1))


def _full_attention(cache: StaticCache) -> bool:
    """Every layer of the static cache a plain full-attention one (no sliding window, no linear
    attention): what GraphDecoder's mask and positions assume."""
    return all(type(layer) is StaticLayer for layer in cache.layers)


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
    dec = _graph_decoders.get(model)
    if dec is None or dec.max_len < max_len:
        dec = _graph_decoders[model] = GraphDecoder(model, -(-max_len // 256) * 256)
    dec.crop(0)
    return dec
