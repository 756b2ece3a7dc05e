"""simplegpt: train, generate with and serve small GPT models.

The tutorial's API works as written:
    from simplegpt import SimpleGPT, SimpleDataset, train, generate_text
"""

__version__ = "0.1.0"

from .model import GPT, GPTConfig, preset_config  # noqa: E402
# The submodule simplegpt.train is loaded before the tutorial's `train` function is bound to the same
# name: loading it later (`from simplegpt.train import ...`) would replace the function with the module.
from . import train as _train_module  # noqa: E402,F401
from .seed import GPTBlock, SimpleDataset, SimpleGPT, default_device, generate_text, train  # noqa: E402
from .tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer, load_tokenizer  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

__all__ = [
    "GPT", "GPTConfig", "preset_config", "GPTBlock", "SimpleDataset", "SimpleGPT", "default_device",
    "generate_text", "train", "Tokenizer", "GPT2Tokenizer", "CharTokenizer", "ByteTokenizer",
    "get_tokenizer", "load_tokenizer", "load_checkpoint", "save_checkpoint",
]
