"""simplegpt: train, generate with and serve small GPT models.

The tutorial's API works as written (simplegpt/tutorial.py):
    from simplegpt import SimpleGPT, SimpleDataset, train, generate_text

No submodule is named after a name bound here (the trainer's public names are in simplegpt.trainer),
so importing any submodule leaves these names as they are.
"""

__version__ = "0.1.0"

from .model import GPT, GPTConfig, preset_config  # noqa: E402
from .tutorial import GPTBlock, SimpleDataset, SimpleGPT, default_device, generate_text, train  # noqa: E402
from .tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer, load_tokenizer  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

__all__ = [
    "GPT", "GPTConfig", "preset_config", "GPTBlock", "SimpleDataset", "SimpleGPT", "default_device",
    "generate_text", "train", "Tokenizer", "GPT2Tokenizer", "CharTokenizer", "ByteTokenizer",
    "get_tokenizer", "load_tokenizer", "load_checkpoint", "save_checkpoint",
]
