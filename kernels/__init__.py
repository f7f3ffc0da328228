"""Triton inference kernels for the compressed formats our exports write, each beside a plain
PyTorch reference of the same math. Imports only torch and triton (never ``compress`` or ``eval``).

    tiles.py     what the kernels share: tile configs, split-K, the launch, the jit pieces of a K loop
    wna16.py     W4A16 / W8A16 GEMM and GEMV on compressed-tensors' pack-quantized layout
    sparse24.py  2:4 sparse GEMM / GEMV, float values or int4 codes, on our compressed 2:4 layout
    selftest.py  every kernel vs its reference: python -m kernels.selftest (TRITON_INTERPRET=1 on CPU)

Note the name: Hugging Face ships a ``kernels`` package that transformers probes; with no
distribution metadata ours reports no version, so transformers treats it as absent (a test loads
the real teacher's GGUF with this repository first on sys.path).
"""
