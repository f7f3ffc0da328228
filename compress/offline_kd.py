"""Offline KD: the teacher's top-k log-probs, computed once to disk and streamed in training.

Layout of ``<dir>``:
    manifest.json            {"format": FORMAT, "key": ..., "k": k, "temperature": T, "vocab_size": Vt,
                              "shard_blocks": S, "blocks": [block indices], and once precompute finishes
                              "tokens", "bytes_per_token" (shard files / tokens), "recon_kl" (nats/token)}
    shard_00000.safetensors  {"index": (n,) int64, **encode_topk(...)}: safetensors, so no pickle is loaded
    shard_00000.json         {"sha256", "bytes", "tokens", "recon_kl_sum"}, written after its shard
Only the blocks the run will visit are computed: the training order is a function of
(seed, step), so that set is known up front. A shard counts as done when it and its sidecar are
both present and its size matches, so an interrupted precompute resumes where it stopped; ranks
write different shards and each shard's checksum lives beside it. Loading checks the sha256.
A manifest whose key differs (other teacher, data, k, temperature or an older format such as v1's
``shard_*.pt``) makes the folder be rebuilt. ``vocab_size`` is the teacher's: kd_loss needs it
(``teacher_vocab=cache.vocab_size``) to leave a student's padding rows out, as online KD does.

Across tokenizers (``precompute(..., align=...)``, manifest ``"positions": "student"``) the data
blocks are student ids; the teacher runs on its own tokenization of each block's text, and row
(b, s) holds the teacher's top-k at the teacher position that ends at the same byte as student
position s (``compress.cross_tokenizer.align_batch``). Student positions with no such teacher
position hold a filler row (ids 0..k-1, uniform) that the loss never reads: it re-aligns the
block, which is deterministic, and reads only the paired rows. ``tokens``, ``bytes_per_token`` and
``recon_kl`` then count the paired positions only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from compress.checkpoint import publish_file
from compress.errors import CompressError
from compress.losses import teacher_topk

FORMAT = "topk-v2"
_LEVELS = 255  # 8-bit log-prob codes
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # kd_loss's floor for log-probs and the tail bin
_MIN_LOG_TAIL = -30.0  # decoded tails are >= e^-30 (1e-13): keeps the decoded top-k mass below 1 in float64

# ---------------------------------------------------------------------------------------------
# Codec. A shard of n blocks x T tokens, top-k each, is these tensors:
#   id_stream   (M,) uint8     per token, its k ids sorted ascending as id[0], id[1]-id[0]-1, ...,
#                              id[k-1]-id[k-2]-1, each an unsigned LEB128 varint (7 bits a byte, low
#                              bits first, high bit set = another byte follows); tokens back to back
#   row_offsets (n+1,) int64   where each block's bytes start in id_stream (a block decodes alone)
#   codes       (n, T, k) uint8  in the same id order: round((max(lp) - lp) / step)
#   step        (n, T) float32  (max(lp) - min(lp)) / 255 of the token's top-k
#   log_tail    (n, T) float32  log(1 - sum(exp(lp))): the mass outside the top k
# Decoded: lp = log(1 - exp(log_tail)) + log_softmax(-codes * step). The codes give the top-k's
# shape relative to its largest entry (exact: code 0) with a log error <= step/2 on each entry,
# i.e. <= step/2 relative error on each probability, so KL(shape) ~ Var_p(error)/2 <= step^2/8,
# and most of the mass sits where the error is smallest. The mass itself comes from log_tail, not
# from the quantized values: kd_loss's tail bin is 1 - sum, and with a top-1 of 0.999 an error of
# 1e-3 in the top entry would double or zero that bin. The float32 log-probs are rounded down from
# float64 values whose mass is 1 - max(tail, e^-30) < 1, so sum(exp(lp)) < 1 always.
# Size at V=49,152, k=64: gaps average V/k = 768 < 2^14, so <= 2 bytes an id, + 1 a code + 8 a token:
# <= 130 + 64 + 8 = 202 bytes/token (at most two of a token's varints reach 3 bytes) plus 16 bytes a
# block, against v1's 384 (int32 ids + fp16 log-probs); real teachers' ids cluster low: ~164.
# ---------------------------------------------------------------------------------------------


def _varint_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned LEB128 of each x >= 0, back to back: (N,) int64 -> bytes (M,) uint8, length (N,)."""
    nbytes = np.ones(len(x), np.int64)
    for b in range(1, 10):
        nbytes += x >= (1 << (7 * b))
    start = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), np.uint8)
    for b in range(int(nbytes.max(initial=0))):  # one vectorized pass per byte position
        m = nbytes > b
        more = (nbytes[m] > b + 1).astype(np.uint8) << 7
        out[start[m] + b] = ((x[m] >> (7 * b)) & 0x7F).astype(np.uint8) | more
    return out, nbytes


def _varint_decode(buf: np.ndarray) -> np.ndarray:
    """Inverse of _varint_encode: (M,) uint8 -> (N,) int64."""
    ends = np.flatnonzero(buf < 0x80)  # a value's last byte has the high bit clear
    assert len(buf) == 0 or ends[-1] == len(buf) - 1, "varint stream ends inside a value"
    starts = np.concatenate([[0], ends[:-1] + 1])
    lens = ends - starts + 1
    x = np.zeros(len(ends), np.int64)
    for b in range(int(lens.max(initial=0))):
        m = lens > b
        x[m] |= (buf[starts[m] + b].astype(np.int64) & 0x7F) << (7 * b)
    return x


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def encode_topk(ids: torch.Tensor, logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pack top-k ids (n, T, k) (distinct per token) and their log-probs (n, T, k) as the layout above.

        packed = encode_topk(*teacher_topk(logits, k=64, temperature=2.0))
    """
    assert ids.shape == logprobs.shape and ids.dim() == 3, f"ids {tuple(ids.shape)} / logprobs {tuple(logprobs.shape)}"
    n, T, k = ids.shape
    ids, order = ids.long().cpu().sort(-1)
    lp = logprobs.double().cpu().gather(-1, order)  # (n, T, k) in id order
    assert torch.isfinite(lp).all(), "log-probs must be finite (teacher_topk floors them)"
    gaps = torch.cat([ids[..., :1], ids.diff(dim=-1) - 1], -1)  # (n, T, k)
    assert (gaps >= 0).all(), "top-k ids must be distinct within a token"
    stream, nbytes = _varint_encode(gaps.reshape(-1).numpy())
    row_offsets = np.concatenate([[0], np.cumsum(nbytes.reshape(n, T * k).sum(1))])
    d = lp.max(-1, keepdim=True).values - lp  # (n, T, k) >= 0
    step = (d.max(-1).values / _LEVELS).clamp_min(1e-30).float()  # (n, T)
    codes = (d / step.double().unsqueeze(-1)).round().clamp(0, _LEVELS).to(torch.uint8)
    log_tail = _log1mexp(torch.logsumexp(lp, -1).clamp_max(-1e-300)).clamp_min(_LOG_FLOOR).float()
    return {"id_stream": torch.from_numpy(stream), "row_offsets": torch.from_numpy(row_offsets),
            "codes": codes, "step": step, "log_tail": log_tail}


def decode_topk(packed: dict[str, torch.Tensor], rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``rows`` (default all) of encode_topk's output -> ids (r, T, k) long, ascending per token,
    and logprobs (r, T, k) float32 with sum(exp) < 1.

        ids, logprobs = decode_topk(encode_topk(ids, logprobs))
    """
    n, T, k = packed["codes"].shape
    rows = list(range(n)) if rows is None else list(rows)
    stream, off = packed["id_stream"].numpy(), packed["row_offsets"].numpy()
    buf = np.concatenate([stream[off[r] : off[r + 1]] for r in rows]) if rows else stream[:0]
    gaps = torch.from_numpy(_varint_decode(buf))
    assert gaps.numel() == len(rows) * T * k, f"{gaps.numel()} ids decoded, expected {len(rows) * T * k}"
    ids = gaps.view(len(rows), T, k).cumsum(-1) + torch.arange(k)  # undo id[i] - id[i-1] - 1
    d = packed["codes"][rows].double() * packed["step"][rows].double().unsqueeze(-1)  # (r, T, k)
    log_tail = packed["log_tail"][rows].double().clamp(_MIN_LOG_TAIL, -1e-300)
    lp64 = _log1mexp(log_tail).unsqueeze(-1) + torch.log_softmax(-d, -1)
    lp = lp64.float()
    lp = torch.where(lp.double() > lp64, torch.nextafter(lp, torch.tensor(-math.inf)), lp)  # round down
    return ids, lp


def topk_kl(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """KL(exact || approx) per token over kd_loss's k+1 bins (top-k + tail), from two (..., k)
    log-prob tensors over the same ids -> (...) float64 nats."""

    def bins(lp):
        lp = lp.double().clamp_min(_LOG_FLOOR)
        rest = _log1mexp(torch.logsumexp(lp, -1).clamp_max(-1e-300)).clamp_min(_LOG_FLOOR)
        return torch.cat([lp, rest.unsqueeze(-1)], -1)

    p, q = bins(exact), bins(approx)
    return (p.exp() * (p - q)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Shards on disk
# ---------------------------------------------------------------------------------------------
_FIX = "delete it and rerun: precompute (the distill stage runs it) rewrites missing shards"


def _shard_path(root: Path, j: int) -> Path:
    return root / f"shard_{j:05d}.safetensors"


def _sidecar_path(root: Path, j: int) -> Path:
    return root / f"shard_{j:05d}.json"


def _shard_done(root: Path, j: int) -> bool:
    try:
        side = json.loads(_sidecar_path(root, j).read_text())
        return _shard_path(root, j).stat().st_size == side["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # missing, half-done or damaged: compute it again


def _well_formed(shard: dict[str, torch.Tensor]) -> bool:
    """What decode_topk relies on, checked once per load: a file may come from elsewhere."""
    if {*shard} != {"index", "id_stream", "row_offsets", "codes", "step", "log_tail"}:
        return False
    codes, stream, off = shard["codes"], shard["id_stream"], shard["row_offsets"]
    if codes.dim() != 3 or codes.dtype != torch.uint8 or stream.dtype != torch.uint8 or off.dtype != torch.int64:
        return False
    n, T, k = codes.shape
    if n == 0 or off.shape != (n + 1,) or shard["index"].shape != (n,) or not shard["step"].shape == shard["log_tail"].shape == (n, T):
        return False
    if off[0] != 0 or off[-1] != len(stream) or not (off.diff() > 0).all():
        return False
    last = np.concatenate([[0], np.cumsum(stream.numpy() < 0x80)])  # values completed before each byte
    per_row = np.diff(last[off.numpy()])
    return bool((per_row == T * k).all() and (stream.numpy()[off[1:].numpy() - 1] < 0x80).all())


def _load_shard(root: Path, j: int) -> dict[str, torch.Tensor]:
    path, side = _shard_path(root, j), _sidecar_path(root, j)
    if not path.exists():
        raise CompressError(f"offline KD shard {path} is missing; rerun precompute (the distill stage runs it), "
                            "which rewrites missing shards")
    try:
        want = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressError(f"offline KD shard {path} has no readable checksum in {side.name} ({e}); {_FIX}") from e
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != want:
        raise CompressError(f"offline KD shard {path} is corrupt (its sha256 differs from {side.name}); {_FIX}")
    try:
        shard = load_safetensors(data)
    except SafetensorError as e:
        raise CompressError(f"offline KD shard {path} is unreadable ({e}); {_FIX}") from e
    if not _well_formed(shard):
        raise CompressError(f"offline KD shard {path} does not hold format {FORMAT}'s tensors; {_FIX}")
    return shard


def _manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None  # none or unreadable: the folder is rebuilt


def _at_student_positions(ids: torch.Tensor, lp: torch.Tensor, al: dict, T: int, vocab_size: int):
    """The teacher's top-k over its own positions (B, Tt, k) -> rows at the student's positions
    (B, T, k), the filler where a student position has no teacher partner, and the (B, T) paired mask."""
    B, _, k = ids.shape
    out_ids = torch.arange(k).expand(B, T, k).clone()
    out_lp = torch.full((B, T, k), -math.log(vocab_size), dtype=lp.dtype)
    keep = al["pair_mask"].cpu()
    b = torch.arange(B)[:, None].expand_as(keep)[keep]
    s, t = al["s_pos"].cpu()[keep], al["t_pos"].cpu()[keep]
    out_ids[b, s], out_lp[b, s] = ids[b, t], lp[b, t]
    paired = torch.zeros(B, T, dtype=torch.bool)
    paired[b, s] = True
    return out_ids, out_lp, paired


def precompute(teacher, data, blocks: list[int], root: Path, *, k: int, temperature: float, key_parts: list,
               shard_blocks: int, batch_size: int, rank: int, world: int, barrier, device, align=None) -> "TopkCache":
    """Write the teacher's top-k at ``temperature`` for ``blocks`` into ``root`` (each rank its shards,
    skipping finished ones), measure the codec's KL over what it wrote, and open the cache.

        cache = precompute(teacher, data, blocks, root, k=64, temperature=2.0, key_parts=[src, data.key],
                           shard_blocks=64, batch_size=8, rank=0, world=1, barrier=lambda: None, device="cpu")

    ``align``: for a student with another tokenizer, a function of the student ids (B, T) returning
    ``align_batch``'s dict; the cache then holds the teacher's rows at the student's positions.
    """
    blocks = sorted(set(blocks))
    root = Path(root)
    vocab_size = teacher.config.vocab_size
    positions = "teacher" if align is None else "student"
    key_json = json.dumps([FORMAT, *key_parts, k, temperature, vocab_size, shard_blocks, blocks]
                          + ([] if align is None else [positions]))
    key = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    meta = {"format": FORMAT, "key": key, "k": k, "temperature": temperature, "vocab_size": vocab_size,
            "shard_blocks": shard_blocks, "blocks": blocks, "positions": positions}
    if rank == 0:
        old = _manifest(root)
        if old is None or old.get("key") != key:  # for another teacher/data/k, or an older format: start over
            for f in [root / "manifest.json", *root.glob("shard_*")]:
                f.unlink(missing_ok=True)
            publish_file(root / "manifest.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    barrier()
    shards = [blocks[i : i + shard_blocks] for i in range(0, len(blocks), shard_blocks)]
    mine = [j for j in range(len(shards)) if j % world == rank and not _shard_done(root, j)]
    for j in tqdm(mine, desc="teacher top-k", disable=rank != 0 or not mine):
        index = torch.tensor(shards[j], dtype=torch.long)
        ids_out, lp_out, paired_out = [], [], []
        for i in range(0, len(index), batch_size):
            x = data.batch(index[i : i + batch_size])["input_ids"].to(device)
            al = None if align is None else align(x)
            logits = teacher.logits(x if al is None else al["teacher_ids"].to(device)).float()  # (B, T or Tt, Vt)
            assert logits.shape[-1] == vocab_size, f"teacher gives {logits.shape[-1]} logits, its config says {vocab_size}"
            ids, lp = (t.cpu() for t in teacher_topk(logits, k, temperature))
            paired = torch.ones(ids.shape[:2], dtype=torch.bool)
            if al is not None:
                ids, lp, paired = _at_student_positions(ids, lp, al, x.shape[1], vocab_size)
            ids_out.append(ids)
            lp_out.append(lp)
            paired_out.append(paired)
        ids, lp, paired = torch.cat(ids_out), torch.cat(lp_out), torch.cat(paired_out)  # (n, T, k), (n, T)
        packed = encode_topk(ids, lp)
        dec_ids, dec_lp = decode_topk(packed)
        sorted_ids, order = ids.sort(-1)
        assert torch.equal(dec_ids, sorted_ids), "top-k codec lost ids"
        kl = topk_kl(lp.gather(-1, order), dec_lp)[paired]  # the rows the loss reads
        blob = save_safetensors({"index": index, **packed}, metadata={"format": FORMAT})
        publish_file(_shard_path(root, j), lambda tmp: tmp.write_bytes(blob))
        side = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "tokens": kl.numel(),
                "recon_kl_sum": kl.sum().item()}
        publish_file(_sidecar_path(root, j), lambda tmp: tmp.write_text(json.dumps(side)))  # marks the shard done
    barrier()
    if rank == 0:
        sides = [json.loads(_sidecar_path(root, j).read_text()) for j in range(len(shards))]
        tokens = sum(s["tokens"] for s in sides)
        meta |= {"tokens": tokens, "bytes_per_token": sum(s["bytes"] for s in sides) / max(tokens, 1),
                 "recon_kl": sum(s["recon_kl_sum"] for s in sides) / max(tokens, 1)}
        publish_file(root / "manifest.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    barrier()
    return TopkCache(root)


class TopkCache:
    """The teacher's top-k per block, read from a folder ``precompute`` wrote.

        ids, logprobs = TopkCache(root).get(batch["index"], device)  # (B, T, k) long, float32
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise CompressError(f"{self.root} has no manifest.json, so it is no offline KD cache; rerun precompute "
                                "(the distill stage runs it) to build one there")
        meta = _manifest(self.root)
        if meta is None:
            raise CompressError(f"{self.root / 'manifest.json'} is unreadable; delete it and rerun precompute")
        if meta.get("format") != FORMAT:
            raise CompressError(f"{self.root} holds an offline KD cache in format {meta.get('format', 'v1')!r}, this "
                                f"version reads {FORMAT!r}; rerun precompute (the distill stage runs it), which rebuilds it")
        self.vocab_size = meta["vocab_size"]  # the teacher's: pass as kd_loss(teacher_vocab=...)
        # "teacher": row t is the teacher's position t (one tokenizer); "student": the teacher's rows
        # placed at the student positions they align with (another tokenizer; see the module doc)
        self.positions = meta.get("positions", "teacher")
        self.k, self.temperature = meta["k"], meta["temperature"]
        # what precompute measured over every shard (None until it finished): nats/token, bytes/token
        self.recon_kl, self.bytes_per_token = meta.get("recon_kl"), meta.get("bytes_per_token")
        # block index -> (shard, row): shards hold consecutive runs of the sorted block list
        self.where = {b: divmod(pos, meta["shard_blocks"]) for pos, b in enumerate(meta["blocks"])}
        self._loaded: dict[int, dict] = {}

    def _shard(self, j: int) -> dict:
        if j not in self._loaded:
            if len(self._loaded) >= 4:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[j] = _load_shard(self.root, j)
        return self._loaded[j]

    def get(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``indices`` (B,) -> ids (B, T, k) long, logprobs (B, T, k) float32, for kd_loss(teacher_topk=...).

        Ids come ascending per token, not by log-prob: kd_loss gathers the student at them in any order.
        """
        wanted = indices.tolist()
        by_shard = defaultdict(list)  # shard -> [(position in the batch, row)]
        for pos, b in enumerate(wanted):
            if b not in self.where:
                raise CompressError(f"block {b} is not in the offline KD cache {self.root}; it was made for other "
                                    "steps or data: rerun precompute for this run")
            j, row = self.where[b]
            by_shard[j].append((pos, row))
        ids, lps = [None] * len(wanted), [None] * len(wanted)
        for j, items in by_shard.items():
            shard = self._shard(j)
            rows = [row for _, row in items]
            assert shard["index"][rows].tolist() == [wanted[pos] for pos, _ in items], "offline KD cache out of order"
            for (pos, _), i, lp in zip(items, *decode_topk(shard, rows)):
                ids[pos], lps[pos] = i, lp
        return torch.stack(ids).to(device), torch.stack(lps).to(device)
