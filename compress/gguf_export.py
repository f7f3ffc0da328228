"""A GGUF file for llama.cpp from a Llama-layout model: projections in Q8_0 or Q4_0, the rest in F32.

    write_gguf(model, "out/model-q4_0.gguf", "q4_0", tokenizer_gguf=<the teacher's .gguf>)

A quantized model passes its own values and block scales (``blocks``: what its fake-quant forward
computes, from GPTQ's fixed scales or any other), and the file holds exactly those; any other
projection is block-rounded here by ``compress.quant.gguf_quantize`` (bit-exact with ggml and the
``gguf`` package). Either way the blocks are packed by ``compress.quant.pack_gguf``, so a model
trained with that fake-quant loads back with the weights it trained with. The tokenizer and
general metadata are copied from a GGUF file of the same tokenizer (the teacher's); the
architecture fields come from the model's config. Tensor names and the q/k
row permutation follow llama.cpp's converter (transformers' GGUF loader undoes the permutation).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.checkpoint import publish_file
from compress.errors import CompressError
from compress.models import head_dim
from compress.quant import GGUF_BLOCK, gguf_quantize, pack_gguf

BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
QUANTIZED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise CompressError(f"GGUF export does not know the tensor {name!r}; it supports Llama-layout models")
    return f"blk.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k layout: within each head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copied_fields(reader) -> list[tuple[str, object, object, object]]:
    from gguf import GGUFValueType

    out = []
    for field in reader.fields.values():
        if not field.name.startswith(("tokenizer.", "general.")) or field.name in ("general.architecture",
                                                                                 "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        out.append((field.name, field.contents(), vtype, sub))
    return out


def write_gguf(model: nn.Module, path: str | os.PathLike, kind: str, tokenizer_gguf: str | os.PathLike,
               blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """``blocks``: a projection's weight name -> (values (out, in), block scales d (out, in / 32)) to write
    for it; projections not in it are block-rounded from their float weights."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise CompressError(f"GGUF export supports Llama-layout models, not {cfg.model_type!r}")
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}.get(kind)
    if qtype is None:
        raise CompressError(f"GGUF type {kind!r} is not supported; use q8_0 or q4_0")
    hd = head_dim(cfg)
    blocks = blocks or {}

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), arch="llama")
        for name, value, vtype, sub in _copied_fields(GGUFReader(str(tokenizer_gguf))):
            writer.add_key_value(name, value, vtype, sub_type=sub)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else LlamaFileType.MOSTLY_Q4_0)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
        if getattr(cfg, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # llama.cpp reads token_embd for a missing output
        for name, t in state.items():
            gname = gguf_name(name)
            if gname.split(".")[-2] in QUANTIZED and gname.endswith(".weight"):
                if t.shape[1] % GGUF_BLOCK:
                    raise CompressError(f"GGUF {kind} packs blocks of {GGUF_BLOCK} inputs; {name} has {t.shape[1]}")
                w, raw = pack_gguf(*(blocks.get(name) or gguf_quantize(t, kind)), kind), qtype
            else:
                w, raw = t.detach().to(torch.float32).cpu().numpy(), None
            # rows are quantized independently, so the packed rows permute as the float ones would
            if gname.endswith("attn_q.weight"):
                w = permute_rows(w, cfg.num_attention_heads)
            elif gname.endswith("attn_k.weight"):
                w = permute_rows(w, cfg.num_key_value_heads)
            writer.add_tensor(gname, w, raw_dtype=raw)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return publish_file(path, write)
