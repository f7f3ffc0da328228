import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
if not torch.cuda.is_available():  # the Triton kernels run in the interpreter here (set before any @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from eval import stage as _eval_stage  # noqa: E402,F401  (registers `kind: eval`, as launch/ does)
from tests.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 4-layer, 64-wide Llama with the real SmolLM2 tokenizer (saved as an HF folder)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "teacher", layers=4, hidden=64, seed=0)
