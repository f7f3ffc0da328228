"""Decoding with a KV cache: batched sampling of continuations for on-policy KD, and the static-cache
decoder (CUDA graphs) that it and ``eval.decoders`` share.

    seqs = sample_continuations(student, prompts, new_tokens=96, temperature=1.0, top_p=0.95, generator=g)

Every row gets exactly ``new_tokens`` tokens (no early stop at EOS), so a batch stays (B, P + n)
without padding, and ranks that each sample their own rows run the same number of forwards (a
ZeRO-3 model gathers its layers in lockstep). ``temperature == 0`` is greedy. The model is put in
eval mode for the sampling and restored after.

``interleaved_continuations(student, teacher, prompts, n, accept_top_k=25)``: the student proposes
each token and the teacher keeps it or replaces it (SKD); the same contract.

``GraphDecoder(model, max_len)``: a StaticCache of max_len tokens (any batch size, fixed by its first
feed). On CUDA a feed of n <= GRAPH_MAX new tokens replays a CUDA graph captured for that n (the
first feed of each n captures it), so a decode step costs the GPU's time, not Python's. Longer
feeds (a prompt's prefill) and every feed off CUDA run the same static-cache forward eagerly, so
the CPU tests check the graph path's positions, mask and roll-back. The graph path reads every
position from the device: positions and the causal mask come from the cache's own length tensor
(advanced inside the graph by the cache update), so a replay needs no host value; the mask is a 4-D
additive mask over the whole static cache, which also keeps transformers' mask helpers (they
compare the cache offset on the host) out of the capture. A graph reads the weights where they were
when it was captured: if any parameter or buffer has moved since (an optimizer or a wrapper that
reallocates them), the graphs are dropped when the next sequence starts and captured again, never
replayed on stale memory.
On CUDA, ``sample_continuations`` decodes on such a decoder (kept per model and batch size, reused
across calls while the length fits) unless the model's parameters are ZeRO-3 partitioned (their
forwards gather layers, which a graph cannot replay); elsewhere on a DynamicCache.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import weakref
from collections.abc import MutableMapping

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from compress.errors import CompressError

log = logging.getLogger("compress.sampling")
GRAPH_MAX = 16  # feeds up to this many tokens are captured (decode steps, k + 1 verify passes)
_samplers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {batch size: GraphDecoder}


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
                         vocab_size: int | None = None, graphs: bool | None = None) -> torch.Tensor:
    """(B, P) prompts -> (B, P + new_tokens): each row continued by ``model``'s own samples.

    ``vocab_size`` restricts sampling to ids [:vocab_size] (a student's embedding padding rows
    must never be drawn); default the model config's. ``graphs``: decode on a static cache (CUDA
    graphs on CUDA); None (default): on CUDA where the model allows it (see the module's note).
    """
    _check_request(prompts, new_tokens, temperature, top_p)
    check_cache_argument()
    was_training = model.training
    model.eval()
    try:
        step = _stepper(model, prompts.shape[0], prompts.shape[1] + new_tokens, graphs)
        seq, feed = prompts, prompts
        for _ in range(new_tokens):
            feed = _pick(step(feed)[:, :vocab_size], temperature, top_p, generator)  # (B, 1)
            seq = torch.cat([seq, feed], dim=1)
        return seq
    finally:
        model.train(was_training)


@torch.no_grad()
def interleaved_continuations(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, new_tokens: int, *,
                              accept_top_k: int, temperature: float = 1.0, top_p: float = 1.0,
                              generator: torch.Generator | None = None, vocab_size: int | None = None,
                              graphs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved sampling (SKD, Xu et al. 2024, "Speculative Knowledge Distillation"): at each
    position the student proposes a token (its own sample); the teacher keeps it when it is among
    the teacher's ``accept_top_k`` most probable next tokens, else puts its own sample there. The
    text is the student's wherever the teacher finds it plausible, so the student trains on its own
    states without drifting into text the teacher would never continue. Both models decode in
    lockstep, each on its own KV cache. ``accept_top_k=1`` with ``temperature=0`` is the teacher's
    greedy path (up to exact ties). Returns ((B, P + new_tokens) ids, (B, new_tokens) bool: the
    student's proposal kept)."""
    if accept_top_k < 1:
        raise CompressError(f"accept_top_k={accept_top_k}: the teacher keeps proposals among its top k >= 1 tokens")
    _check_request(prompts, new_tokens, temperature, top_p)
    check_cache_argument()
    modes = [(m, m.training) for m in (student, teacher)]
    for m, _ in modes:
        m.eval()
    try:
        b, length = prompts.shape[0], prompts.shape[1] + new_tokens
        s_step, t_step = (_stepper(m, b, length, graphs) for m in (student, teacher))
        seq, feed, kept = prompts, prompts, []
        for _ in range(new_tokens):
            zs, zt = s_step(feed)[:, :vocab_size], t_step(feed)[:, :vocab_size]  # (both on the prompts' device)
            proposal = _pick(zs, temperature, top_p, generator)  # (B, 1)
            ahead = (zt > zt.gather(-1, proposal)).sum(-1, keepdim=True)  # teacher ids strictly more probable
            keep = ahead < accept_top_k
            feed = torch.where(keep, proposal, _pick(zt, temperature, top_p, generator))
            seq = torch.cat([seq, feed], dim=1)
            kept.append(keep)
        return seq, torch.cat(kept, dim=1)
    finally:
        for m, training in modes:
            m.train(training)


def _check_request(prompts: torch.Tensor, new_tokens: int, temperature: float, top_p: float) -> None:
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise CompressError(f"prompts must be (B, P) with P >= 1 token, got {tuple(prompts.shape)}")
    if new_tokens < 1:
        raise CompressError(f"new_tokens={new_tokens}: sample at least 1 token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise CompressError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")


def _stepper(model: nn.Module, batch: int, max_len: int, graphs: bool | None):
    """feed (B, n) -> (B, V) fp32 logits of the next token, on a fresh KV cache for ``model``: a
    static-cache decoder (graphs on CUDA) where ``graphs`` (None: where the model allows it), else a
    DynamicCache."""
    if graphs is None:
        graphs = serves_graphs(model) and not any(hasattr(p, "ds_status") for p in model.parameters())
    if graphs:
        dec = _sampler_decoder(model, batch, max_len)
        return lambda feed: dec.feed(feed, 1)[:, -1]
    cache = DynamicCache(config=model.config)
    return lambda feed: model(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: argmax at temperature 0, else a draw from the nucleus."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = top_p_filter(logits / temperature, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def _sampler_decoder(model: nn.Module, batch: int, max_len: int) -> GraphDecoder:
    """This model's static-cache decoder for ``batch`` rows (lengths rounded up to a multiple of 64)."""
    return kept_decoder(_samplers.setdefault(model, {}), batch, model, max_len, 64)


def kept_decoder(kept: MutableMapping, key, model: nn.Module, max_len: int, multiple: int) -> GraphDecoder:
    """The GraphDecoder ``kept[key]`` emptied for a new sequence, reused with its graphs while max_len
    fits; a new one (its length rounded up to a multiple of ``multiple``) when max_len outgrows it."""
    dec = kept.get(key)
    if dec is None or dec.max_len < max_len:
        dec = kept[key] = GraphDecoder(model, -(-max_len // multiple) * multiple)
    dec.crop(0)
    return dec


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
        self.batch: int | None = None  # rows, fixed by the first feed (the cache is allocated for them)
        self.graphs: dict[int, tuple] = {}  # n -> (graph, ids buffer, logits buffer)
        self.captured_from: tuple[int, ...] = ()  # where the weights were when the graphs were captured
        self.pool = None
        self.graph_error: str | None = None  # why a capture failed: then every call runs eagerly

    @property
    def model(self):
        return self._model()

    def forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """One row: ids (n,) -> (keep, V) fp32 logits of its last ``keep`` positions."""
        return self.feed(ids[None], keep)[0]

    def feed(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """ids (B, n) after what the cache holds -> (B, keep, V) fp32 logits."""
        b, n = ids.shape
        if self.batch is not None and b != self.batch:
            raise CompressError(f"this static KV cache holds {self.batch} rows; a feed of {b} needs its own decoder")
        if self.length + n > self.max_len:
            raise CompressError(f"the static KV cache holds {self.max_len} tokens; {self.length} + {n} do not fit "
                                "(pass a larger max_len)")
        self.batch = b
        ids = ids.to(self.device)
        if self.length == 0 and self.graphs and _storage(self.model) != self.captured_from:
            self.graphs.clear()  # a new sequence, and the weights moved: those graphs would read freed or stale memory
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
            ids_buffer.copy_(ids)
            graph.replay()
        else:
            logits = self._step(ids, n)
        self.length += n
        return logits[:, -keep:].float().clone()

    def crop(self, n: int) -> None:
        if n < self.length:
            with torch.inference_mode():  # the eval loops make the cache's tensors under it
                self.cache.crop(-(self.length - n))
            self.length = n

    def check_croppable(self) -> None:
        """A static cache always rolls back (checked when it was built)."""

    def _step(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """The forward of n new tokens (B, n) at the cache's own (device) length: positions and a
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
        ids_buffer = torch.zeros(self.batch, n, dtype=torch.long, device=self.device)
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
        self.captured_from = _storage(self.model)


def _storage(model: nn.Module) -> tuple[int, ...]:
    """Where each parameter and buffer lives: what a captured graph reads."""
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def serves_graphs(model) -> bool:
    """Whether ``graphs=True`` would capture this model's decode steps: a CUDA model whose KV cache is
    all full attention (what GraphDecoder takes)."""
    return model.device.type == "cuda" and _full_attention(StaticCache(config=model.config, max_cache_len=1))


def _full_attention(cache: StaticCache) -> bool:
    """Every layer of the static cache a plain full-attention one (no sliding window, no linear
    attention): what GraphDecoder's mask and positions assume."""
    return all(type(layer) is StaticLayer for layer in cache.layers)
