"""Cross-tokenizer distillation: align two tokenizations of one text, and the losses across vocabularies.

Pure functions, no modules; the only state is a small cache of each tokenizer's id -> bytes table.

* Alignment. Every token is a run of bytes of the text. A student position and a teacher position
  pair up when their tokens END at the same byte: both next-token predictions are then about the
  continuation that starts at that byte. Offsets are in bytes from each token's own bytes (byte-level
  BPE 'Ġ'-alphabet, SentencePiece '▁' and '<0xNN>' byte fallback), so a token that ends inside a
  multi-byte character is placed exactly; char offsets (``return_offsets_mapping``) cannot do that.
* ULD, Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss for LLMs": sum_i |sort_desc(p_s)_i - sort_desc(p_t)_i|, the shorter vocabulary zero-padded.
* GOLD-style hybrid (TRL's GOLD trainer idea): ids whose tokens are the same bytes in both vocabularies
  get a forward KL on the renormalized shared ids; the ids left over on each side get ULD.

    s_tok = load_student_tokenizer("mistral-7b-v0.1")
    batch = align_batch(student_ids, s_tok, t_tok)                  # teacher_ids, s_pos, t_pos, pair_mask
    zs, zt = aligned_logits(student_logits, teacher_logits, batch)  # (N, Vs), (N, Vt)
    loss = gold_loss(zs, zt, vocab_overlap(s_tok, t_tok), temperature=2.0)
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.errors import CompressError

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / ".cache/tokenizers"
# name -> (file under TOKENIZER_DIR, sha256). scripts/setup.sh extracts the file from the wheel of
# the PyPI package mistral-common 1.13.1 (Apache-2.0): mistral_common/data/tokenizer.model.v1, the
# SentencePiece BPE model of Mistral-7B-v0.1 (32,000 ids, byte fallback).
STUDENT_TOKENIZERS = {
    "mistral-7b-v0.1": ("mistral-7b-v0.1.model", "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
}
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # as compress.losses: no -inf in a KL
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_student_tokenizer(source: str):
    """A tokenizer from ``STUDENT_TOKENIZERS`` (offline, from ``.cache/tokenizers``), else ``models.load_tokenizer``."""
    if source not in STUDENT_TOKENIZERS:
        from compress.models import load_tokenizer

        return load_tokenizer(source)
    name, sha = STUDENT_TOKENIZERS[source]
    path = TOKENIZER_DIR / name
    if not path.is_file():
        raise CompressError(f"tokenizer {source!r} not found at {path}; run `bash scripts/setup.sh` (extracts it from the PyPI package mistral-common)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise CompressError(f"{path} is not the expected {source!r} tokenizer (sha256 differs); delete it and rerun `bash scripts/setup.sh`")
    return _sentencepiece_bpe(data)


def _sentencepiece_bpe(model_bytes: bytes):
    # A SentencePiece BPE model as a fast tokenizer without the sentencepiece package: the protobuf is
    # read with transformers' copy of its schema, merges are ranked by piece score (Mistral ranks its
    # '▁▁'-runs last, so id order is wrong), and the dummy prefix is always prepended as SentencePiece
    # does (Metaspace skips it when the text starts with a space). Token for token equal to
    # sentencepiece 0.2.3 on 409 texts (the Python docs, non-ASCII, whitespace runs) when written.
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_bytes)
    if proto.trainer_spec.model_type != 2:  # 2 = BPE in sentencepiece_model.proto
        raise CompressError("only SentencePiece BPE models are supported as student tokenizers; give a BPE .model or an HF tokenizer folder")
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in pieces})
    spec = proto.trainer_spec
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token=pieces[spec.unk_id].piece,
                         bos_token=pieces[spec.bos_id].piece, eos_token=pieces[spec.eos_id].piece)
    steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    tok.backend_tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.backend_tokenizer.pre_tokenizer = None
    tok.pad_token = tok.eos_token
    return tok


# ---- token bytes and spans ----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _vocab_table(tok) -> tuple[list[bytes], frozenset, frozenset]:
    """(bytes of each id, special ids, SentencePiece byte-fallback ids); special tokens have no bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise CompressError(f"{type(tok).__name__} is not a fast tokenizer; cross-tokenizer alignment needs one (AutoTokenizer gives it)")
    decoder = json.dumps(json.loads(backend.decoder.__getstate__()), ensure_ascii=False) if backend.decoder else ""
    byte_level = '"ByteLevel"' in decoder
    if not byte_level and "\u2581" not in decoder and "Metaspace" not in decoder:
        raise CompressError(f"{type(tok).__name__}: cross-tokenizer alignment needs a byte-level BPE or SentencePiece-style tokenizer")
    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    added = tok.added_tokens_decoder
    special = frozenset(i for i, t in added.items() if t.special) | frozenset(tok.all_special_ids)
    table, fallback = [b""] * len(tok), set()
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        if i in added:
            table[i] = piece.encode()
        elif byte_level:
            table[i] = bytes(unbyte[c] for c in piece) if all(c in unbyte for c in piece) else piece.encode()
        elif m := _BYTE_PIECE.fullmatch(piece):
            table[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            table[i] = piece.replace("\u2581", " ").encode()
    return table, special, frozenset(fallback)


def token_bytes(tok) -> list[bytes]:
    """The bytes each id stands for ('Ġ'/'▁' markers and '<0xNN>' pieces made real bytes; b'' for special tokens)."""
    return _vocab_table(tok)[0]


def text_spans(tok, text: str) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` (no special tokens added, none parsed) -> (ids, byte end of each token in text.encode()).

    Exact from the token bytes, the SentencePiece dummy-prefix space set aside. If the tokenizer's
    normalizer changed the text (e.g. NFC on non-NFC input), ends come from char offsets instead:
    then a token ending inside a character shares its end with the next one and is not paired.
    """
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    table, data = token_bytes(tok), text.encode()
    stream = b"".join(table[i] for i in ids)
    prefix = len(stream) - len(data)
    if stream.endswith(data) and stream[:prefix].strip(b" ") == b"":
        ends, total = [], -prefix
        for i in ids:
            total += len(table[i])
            ends.append(total)
        return ids, ends
    offsets = tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode()))
    starts, ends = [char_to_byte[s] for s, _ in offsets], [char_to_byte[e] for _, e in offsets]
    # characters no token covers (absorbed by the normalizer) belong to the token before them
    return ids, [max(e, nxt) for e, nxt in zip(ends, starts[1:] + [len(data)])]


def match_ends(s_ends: list[int], t_ends: list[int]) -> tuple[list[int], list[int]]:
    """Positions (s, t) whose tokens end at the same byte > 0; of tokens sharing an end, the last
    (its prediction is about what follows that byte; an empty or partial token before it is not)."""
    last_t = {e: j for j, e in enumerate(t_ends) if e > 0}
    last_s = {e: i for i, e in enumerate(s_ends) if e > 0}
    pairs = sorted((i, last_t[e]) for e, i in last_s.items() if e in last_t)
    return [i for i, _ in pairs], [j for _, j in pairs]


def align_positions(text: str, student_tok, teacher_tok, max_student_len: int | None = None):
    """Tokenize ``text`` with both -> (s_ids, t_ids, s_pos, t_pos), long tensors.

    The student side is cut at ``max_student_len`` tokens and the teacher side at the last token
    that ends inside what the student kept; (s_pos[k], t_pos[k]) end at the same byte.
    """
    s_ids, s_ends = text_spans(student_tok, text)
    t_ids, t_ends = text_spans(teacher_tok, text)
    if max_student_len is not None:
        s_ids, s_ends = s_ids[:max_student_len], s_ends[:max_student_len]
    covered = max(s_ends, default=0)
    keep = next((j for j, e in enumerate(t_ends) if e > covered), len(t_ends))
    t_ids, t_ends = t_ids[:keep], t_ends[:keep]
    s_pos, t_pos = match_ends(s_ends, t_ends)
    return tuple(torch.tensor(x, dtype=torch.long) for x in (s_ids, t_ids, s_pos, t_pos))


def _valid_utf8(data: bytes) -> tuple[int, str]:
    # Trim a character cut by the block edges (a leading run of continuation bytes, an unfinished
    # tail) and stop at any other invalid byte: the teacher must see text whose bytes we know.
    lead = 0
    while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:
        lead += 1
    try:
        return lead, data[lead:].decode()
    except UnicodeDecodeError as err:
        return lead, data[lead : lead + err.start].decode()


def _align_row(ids: list[int], student_tok, teacher_tok):
    # Special tokens (EOS between packed documents) split the row; each text run is re-tokenized by
    # the teacher alone and each special becomes the teacher's EOS. Coordinates: bytes of the student
    # stream, plus one virtual unit per special, so a special pairs with the teacher's EOS.
    table, special, _ = _vocab_table(student_tok)
    t_ids, t_ends, s_ends, coord, start, run = [], [], [], 0, 0, []
    for i, tid in enumerate(ids + [None]):
        if tid is not None and tid not in special:
            run.append(tid)
            coord += len(table[tid])
            s_ends.append(coord)
            continue
        lead, text = _valid_utf8(b"".join(table[r] for r in run))
        seg_ids, seg_ends = text_spans(teacher_tok, text) if text else ([], [])
        t_ids += seg_ids
        t_ends += [start + lead + e if e > 0 else 0 for e in seg_ends]
        if tid is not None:
            coord += 1
            s_ends.append(coord)
            t_ids.append(teacher_tok.eos_token_id)
            t_ends.append(coord)
        start, run = coord, []
    return t_ids, *match_ends(s_ends, t_ends)


def align_batch(student_ids: torch.Tensor, student_tok, teacher_tok, max_teacher_len: int | None = None) -> dict:
    """A block of student ids (B, T) -> the teacher's view of the same text, for batched KD.

    Returns teacher_ids (B, Tt) padded with the teacher's pad (else EOS) id, teacher_mask (B, Tt),
    and the aligned pairs s_pos, t_pos (B, P) with pair_mask (B, P): student position s_pos[b, k]
    and teacher position t_pos[b, k] predict the continuation from the same byte. Student special
    tokens become the teacher's EOS. No BOS is added for the teacher.
    """
    if student_ids.dim() != 2:
        raise CompressError(f"align_batch takes student ids (B, T); got shape {tuple(student_ids.shape)}: add or flatten the batch dim")
    if teacher_tok.eos_token_id is None:
        raise CompressError("the teacher tokenizer has no EOS token; set tokenizer.eos_token before cross-tokenizer KD")
    rows = [_align_row(r, student_tok, teacher_tok) for r in student_ids.tolist()]
    if max_teacher_len is not None:  # drop the teacher's tail and the pairs that point into it (t_pos increases)
        rows = [(t[:max_teacher_len], sp[:n], tp[:n]) for t, sp, tp in rows for n in [bisect.bisect_left(tp, max_teacher_len)]]
    B, dev = len(rows), student_ids.device
    Tt, P = max([len(r[0]) for r in rows] + [1]), max([len(r[1]) for r in rows] + [1])
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    out = {"teacher_ids": torch.full((B, Tt), pad, dtype=torch.long), "teacher_mask": torch.zeros(B, Tt, dtype=torch.bool),
           "s_pos": torch.zeros(B, P, dtype=torch.long), "t_pos": torch.zeros(B, P, dtype=torch.long),
           "pair_mask": torch.zeros(B, P, dtype=torch.bool)}
    for b, (t, sp, tp) in enumerate(rows):
        out["teacher_ids"][b, : len(t)] = torch.tensor(t, dtype=torch.long)
        out["teacher_mask"][b, : len(t)] = True
        out["s_pos"][b, : len(sp)] = torch.tensor(sp, dtype=torch.long)
        out["t_pos"][b, : len(tp)] = torch.tensor(tp, dtype=torch.long)
        out["pair_mask"][b, : len(sp)] = True
    return {k: v.to(dev) for k, v in out.items()}


def aligned_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, Vs), (B, Tt, Vt) and an ``align_batch`` result -> the paired rows (N, Vs), (N, Vt)."""
    s_pos, t_pos, keep = batch["s_pos"], batch["t_pos"], batch["pair_mask"]
    if student_logits.dim() != 3 or teacher_logits.dim() != 3 or not student_logits.shape[0] == teacher_logits.shape[0] == s_pos.shape[0]:
        raise CompressError(f"aligned_logits takes (B, T, V) logits with the batch of align_batch; got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    b = torch.arange(s_pos.shape[0], device=s_pos.device)[:, None].expand_as(s_pos)
    return student_logits[b[keep], s_pos[keep]], teacher_logits[b[keep], t_pos[keep]]


# ---- losses -------------------------------------------------------------------------------------

def _rows(student_logits, teacher_logits, mask, temperature, name):
    if student_logits.dim() < 2 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise CompressError(f"{name}: student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits need the same leading dims (N, V); pair positions first with aligned_logits")
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise CompressError(f"{name}: mask {tuple(mask.shape)} must match the logits' leading dims {tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise CompressError(f"{name}: temperature must be > 0, got {temperature}")
    zs = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    return zs, zt, None if mask is None else mask.reshape(-1)


def _masked_mean(per_row: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return per_row.mean()
    w = mask.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp_min(1)  # no rows: 0, still in the graph


def sorted_l1(ps: torch.Tensor, pt: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Per row sum_i |sort_desc(ps)_i - sort_desc(pt)_i|, the shorter side zero-padded: (N, Vs), (N, Vt) -> (N,).

    ``top_k`` sorts only the k largest on each side and adds |tail_s - tail_t| for the masses
    beyond: a lower bound of the exact tail sum, equal to it when one sorted tail is everywhere
    >= the other. None (or k >= both vocabularies) is exact.
    """
    vs, vt = ps.shape[-1], pt.shape[-1]
    if top_k is not None and top_k < max(vs, vt):
        k = min(top_k, vs, vt)
        hs, ht = ps.topk(k, -1).values, pt.topk(k, -1).values
        tail_s = (ps.sum(-1) - hs.sum(-1)).clamp_min(0)
        tail_t = (pt.sum(-1) - ht.sum(-1)).clamp_min(0)
        return (hs - ht).abs().sum(-1) + (tail_s - tail_t).abs()
    ss, st = ps.sort(-1, descending=True).values, pt.sort(-1, descending=True).values
    k = min(vs, vt)
    return (ss[:, :k] - st[:, :k]).abs().sum(-1) + ss[:, k:].sum(-1) + st[:, k:].sum(-1)


def uld_loss(student_logits, teacher_logits, temperature: float = 1.0, mask=None, top_k: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation term (Boizard et al. 2024): the L1 distance between the sorted
    probability vectors softmax(z / T), averaged over (masked) rows. Float32, no T**2 factor.

        loss = ce + lam * uld_loss(zs, zt, mask=mask)    # zs (N, Vs), zt (N, Vt)
    """
    zs, zt, mask = _rows(student_logits, teacher_logits, mask, temperature, "uld_loss")
    return _masked_mean(sorted_l1(zs.softmax(-1), zt.softmax(-1), top_k), mask)


def uld_loss_topk(student_logits, teacher_logprobs, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """ULD against a teacher known by its top-k log-probs only (an offline cache, ``compress.offline_kd``,
    already at ``temperature``): the student's k largest probabilities of softmax(z / T) against the
    teacher's, both sorted, plus |tail_s - tail_t| for the mass beyond them, averaged over (masked)
    rows. (N, Vs), (N, k) -> scalar; equals ``uld_loss(..., top_k=k)`` given the teacher's exact top-k.

        loss = uld_loss_topk(zs, cache_logprobs, temperature=2.0)
    """
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2 or student_logits.shape[0] != teacher_logprobs.shape[0]:
        raise CompressError(f"uld_loss_topk: student logits (N, Vs) and teacher top-k log-probs (N, k) with the same N; "
                            f"got {tuple(student_logits.shape)} and {tuple(teacher_logprobs.shape)}")
    k = teacher_logprobs.shape[-1]
    if k > student_logits.shape[-1]:
        raise CompressError(f"uld_loss_topk: the teacher's top-{k} is wider than the student's vocabulary "
                            f"({student_logits.shape[-1]}); use a smaller top_k")
    zs, _, mask = _rows(student_logits, student_logits, mask, temperature, "uld_loss_topk")
    ps = zs.softmax(-1)
    hs = ps.topk(k, -1).values
    ht = teacher_logprobs.float().exp().sort(-1, descending=True).values
    tail_s = (ps.sum(-1) - hs.sum(-1)).clamp_min(0)
    tail_t = (1 - ht.sum(-1)).clamp_min(0)
    return _masked_mean((hs - ht).abs().sum(-1) + (tail_s - tail_t).abs(), mask)


def vocab_overlap(student_tok, teacher_tok, match_eos: bool = True, include_special: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of ids (s_ids, t_ids), one-to-one, whose tokens are the same bytes.

    Special tokens are left out, except the two EOS ids (``match_eos``) or, with ``include_special``,
    specials with the same text. Of several ids with the same bytes (SentencePiece's '<0x41>' and
    'A'), the one the tokenizer emits is kept: not a byte-fallback piece, then the lowest id.
    """

    def by_bytes(tok):
        table, special, fallback = _vocab_table(tok)
        out = {}
        for i in sorted(range(len(table)), key=lambda i: (i in fallback, i)):
            key = table[i] or (b"\0special:" + tok.convert_ids_to_tokens(i).encode() if include_special and i in special else b"")
            if key and key not in out:
                out[key] = i
        return out

    s_map, t_map = by_bytes(student_tok), by_bytes(teacher_tok)
    pairs = {s_map[b]: t_map[b] for b in s_map.keys() & t_map.keys()}
    s_eos, t_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
    if match_eos and s_eos is not None and t_eos is not None and s_eos not in pairs and t_eos not in pairs.values():
        pairs[s_eos] = t_eos
    s_ids = sorted(pairs)
    return torch.tensor(s_ids, dtype=torch.long), torch.tensor([pairs[i] for i in s_ids], dtype=torch.long)


def gold_loss(student_logits, teacher_logits, overlap: tuple[torch.Tensor, torch.Tensor], temperature: float = 1.0,
              mask=None, match_weight: float = 1.0, rest_weight: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """GOLD-style hybrid across vocabularies, per row, averaged over (masked) rows:

        match_weight * KL(q_t || q_s) + rest_weight * sorted_l1(p_s[rest_s], p_t[rest_t])

    p = softmax(z / T) over the whole vocabulary; q = softmax(z[shared ids] / T), p renormalized on
    the shared ids of ``overlap = vocab_overlap(...)``; rest = the ids outside the overlap on each side
    (unnormalized: how much mass each side keeps off the shared ids counts there). No T**2 factor.
    Identical, fully overlapping vocabularies give forward KL(p_t || p_s).
    """
    zs, zt, mask = _rows(student_logits, teacher_logits, mask, temperature, "gold_loss")
    s_ids, t_ids = (x.to(zs.device) for x in overlap)
    if s_ids.shape != t_ids.shape or s_ids.dim() != 1 or len(s_ids) == 0:
        raise CompressError("gold_loss: overlap must be two equal-length, non-empty 1-D id tensors; build it with vocab_overlap(student_tok, teacher_tok)")
    if int(s_ids.max()) >= zs.shape[-1] or int(t_ids.max()) >= zt.shape[-1]:
        raise CompressError(f"gold_loss: overlap ids exceed the vocabularies ({zs.shape[-1]}, {zt.shape[-1]}); build it from the tokenizers of these models")
    logq_s = F.log_softmax(zs[:, s_ids], -1).clamp_min(_LOG_FLOOR)
    logq_t = F.log_softmax(zt[:, t_ids], -1).clamp_min(_LOG_FLOOR)
    per_row = match_weight * (logq_t.exp() * (logq_t - logq_s)).sum(-1)
    rest_s = torch.ones(zs.shape[-1], dtype=torch.bool, device=zs.device).index_fill_(0, s_ids, False)
    rest_t = torch.ones(zt.shape[-1], dtype=torch.bool, device=zt.device).index_fill_(0, t_ids, False)
    if rest_weight and (rest_s.any() or rest_t.any()):
        per_row = per_row + rest_weight * sorted_l1(zs.softmax(-1)[:, rest_s], zt.softmax(-1)[:, rest_t], top_k)
    return _masked_mean(per_row, mask)
