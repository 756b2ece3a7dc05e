"""The tutorial "How To Implement a Simple GPT Model with PyTorch", replayed with simplegpt.

Same steps, same names, same data: three sentences, batch size 2, 5 epochs, then greedy
generation from "Once upon a time". The differences are the fixes (causal mask, padding
excluded from the loss, GPT-2 architecture, no crash past the context window, device
chosen automatically) and an offline GPT-2 tokenizer instead of a download.

    python examples/tutorial.py
"""

import torch
import torch.optim as optim
from torch.utils.data import DataLoader

from simplegpt import GPTConfig, SimpleDataset, SimpleGPT, default_device, generate_text, get_tokenizer, train

torch.manual_seed(0)
device = default_device()

texts = ["Hello, how are you?", "I am fine, thank you.", "What about you?"]
tokenizer = get_tokenizer("gpt2")  # GPT-2's BPE, built from files installed with simplegpt
dataset = SimpleDataset(texts, tokenizer, max_length=20)
dataloader = DataLoader(dataset, batch_size=2, shuffle=True)

# The tutorial used transformers.GPT2Config; SimpleGPT accepts that too (same field names).
config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=128, n_layer=2, n_head=4)
model = SimpleGPT(config).to(device)

optimizer = optim.Adam(model.parameters(), lr=1e-3)
train(model, dataloader, optimizer, epochs=5, device=device)

prompt = "Once upon a time"
generated_text = generate_text(model, tokenizer, prompt, device=device)
print(generated_text)
