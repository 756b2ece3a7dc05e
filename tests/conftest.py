import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must have ../shared/data beside the checkout")
        pytest.skip(f"{path} not found (tinyshakespeare lives in ../shared/data beside the repo)")
    return path


def seed_style_config(**kw) -> SimpleNamespace:
    """A config with the transformers.GPT2Config field names the tutorial reads."""
    base = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, layer_norm_epsilon=1e-5)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
