"""Issue 27: the seed tutorial's code, line by line as its text has it, runs with simplegpt's
GPT2Tokenizer as it runs with Hugging Face's, and both give the same batches, losses and text.

The tutorial's text lost a few fragments on the way (an import's module, `.to(device)` pairs,
`torch.cat((`, a `break`, the MLP's GELU and Dropout lines and its closing parenthesis); each line that
puts one back says so in a `# restored:` comment. Everything else is the tutorial's own lines. What
the text only describes (the config, the model, the device) is in SETUP. No download: Hugging Face's
tokenizer is built from the GPT-2 files simplegpt ships (simplegpt.hf.write_gpt2_tokenizer_files).
"""

import contextlib
import io

import pytest
import torch

from conftest import seed_style_config

DATA = '''
import torch
from torch.utils.data import Dataset, DataLoader  # restored: the module name
from transformers import GPT2Tokenizer

class SimpleDataset(Dataset):
    def __init__(self, texts, tokenizer, max_length):  # restored: the indentation of these four lines
        self.texts = texts
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, idx):
        text = self.texts[idx]
        encoding = self.tokenizer(text, return_tensors='pt', padding='max_length', truncation=True, max_length=self.max_length)
        return encoding['input_ids'].squeeze(), encoding['attention_mask'].squeeze()

texts = ["Hello, how are you?", "I am fine, thank you.", "What about you?"]
tokenizer = GPT2Tokenizer.from_pretrained('gpt2')
tokenizer.pad_token = tokenizer.eos_token
dataset = SimpleDataset(texts, tokenizer, max_length=20)
dataloader = DataLoader(dataset, batch_size=2, shuffle=True)
'''

MODEL = '''
import torch.nn as nn

class GPTBlock(nn.Module):
    def __init__(self, config):
        super(GPTBlock, self).__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = nn.MultiheadAttention(config.n_embd, config.n_head, dropout=config.attn_pdrop)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),  # restored: the GELU the text describes
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.resid_pdrop),  # restored: the dropout the text describes
        )  # restored: the closing parenthesis

    def forward(self, x, attention_mask=None):
        attn_output, _ = self.attn(x, x, x, attn_mask=attention_mask)
        x = x + attn_output
        x = self.ln_1(x)
        mlp_output = self.mlp(x)
        x = x + mlp_output
        x = self.ln_2(x)
        return x

class SimpleGPT(nn.Module):
    def __init__(self, config):
        super(SimpleGPT, self).__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([GPTBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.config = config

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(0, input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x = self.drop(x)

        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1).repeat(self.config.n_head, attention_mask.size(1), 1)
            attention_mask = attention_mask.to(dtype=torch.float32)  # restored: the right-hand side
            attention_mask = (1.0 - attention_mask) * -10000.0

        for block in self.blocks:
            x = block(x.transpose(0, 1), attention_mask)
            x = x.transpose(0, 1)

        x = self.ln_f(x)
        logits = self.head(x)
        return logits
'''

# What the tutorial describes in words only: a GPT2Config-style config, the model, the device.
SETUP = '''
config = seed_style_config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
device = "cpu"
model = SimpleGPT(config).to(device)
'''

TRAIN = '''
import torch.optim as optim

def train(model, dataloader, optimizer, criterion, epochs=5, device='cuda'):
    for epoch in range(epochs):
        total_loss = 0
        for input_ids, attention_mask in dataloader:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # restored: the .to(device)s
            outputs = model(input_ids, attention_mask)
            shift_logits = outputs[..., :-1, :].contiguous()
            shift_labels = input_ids[..., 1:].contiguous()
            loss = criterion(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            total_loss += loss.item()
        print(f"Epoch {epoch + 1}/{epochs}, Loss: {total_loss / len(dataloader)}")

optimizer = optim.Adam(model.parameters(), lr=1e-4)
criterion = nn.CrossEntropyLoss()
train(model, dataloader, optimizer, criterion, epochs=5, device=device)
'''

GENERATE = '''
def generate_text(model, tokenizer, prompt, max_length=50, device='cuda'):
    input_ids = tokenizer.encode(prompt, return_tensors='pt').to(device)
    generated = input_ids

    for _ in range(max_length):
        outputs = model(generated)
        next_token_logits = outputs[:, -1, :]
        next_token = torch.argmax(next_token_logits, dim=-1).unsqueeze(0)
        generated = torch.cat((generated, next_token), dim=1)  # restored: torch.cat((generated
        if next_token.item() == tokenizer.eos_token_id:
            break  # restored: the break

    generated_text = tokenizer.decode(generated[0], skip_special_tokens=True)
    return generated_text

prompt = "Once upon a time"
generated_text = generate_text(model, tokenizer, prompt, device=device)
'''

TUTORIAL = DATA + MODEL + SETUP + TRAIN + GENERATE


def run_tutorial(code: str) -> tuple[dict, str]:
    """The tutorial's code run top to bottom from one seed: its names and what it printed."""
    torch.manual_seed(0)
    names = {"seed_style_config": seed_style_config, "__name__": "tutorial"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "tutorial", "exec"), names)
    return names, out.getvalue()


def test_the_tutorial_runs_as_written_with_simplegpts_tokenizer():
    """`from transformers import GPT2Tokenizer` becomes `from simplegpt import GPT2Tokenizer`, nothing else:
    pad_token, eos_token(_id), __call__ with return_tensors/padding/truncation, encode(return_tensors=)
    and decode(skip_special_tokens=) raised AttributeError/TypeError before."""
    code = TUTORIAL.replace("from transformers import GPT2Tokenizer", "from simplegpt import GPT2Tokenizer")
    names, printed = run_tutorial(code)
    tok = names["tokenizer"]
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 50256
    ids, mask = names["dataset"][0]
    assert ids.tolist() == [15496, 11, 703, 389, 345, 30] + [50256] * 14 and mask.tolist() == [1] * 6 + [0] * 14
    assert [line.split(",")[0] for line in printed.splitlines()] == [f"Epoch {e}/5" for e in range(1, 6)]
    assert names["generated_text"].startswith("Once upon a time")


def test_the_tutorial_gives_the_same_batches_losses_and_text_with_either_tokenizer(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra provides transformers")
    from simplegpt.hf import write_gpt2_tokenizer_files

    write_gpt2_tokenizer_files(tmp_path, 1024)  # GPT-2's tokenizer files, offline
    hf_code = TUTORIAL.replace("from_pretrained('gpt2')", f"from_pretrained({str(tmp_path)!r})")
    ours_code = TUTORIAL.replace("from transformers import GPT2Tokenizer", "from simplegpt import GPT2Tokenizer")
    hf, hf_printed = run_tutorial(hf_code)
    ours, ours_printed = run_tutorial(ours_code)
    assert type(hf["tokenizer"]).__module__.startswith("transformers")
    for i in range(3):
        assert [t.tolist() for t in ours["dataset"][i]] == [t.tolist() for t in hf["dataset"][i]]
    assert ours_printed == hf_printed
    assert ours["generated_text"] == hf["generated_text"]
    for call in ({}, {"padding": True}, {"padding": "max_length", "max_length": 9, "truncation": True}):
        texts = ["Hello, how are you?", "I am fine"]
        a, b = ours["tokenizer"](texts, **call), hf["tokenizer"](texts, **call)
        assert (a["input_ids"], a["attention_mask"]) == (b["input_ids"], b["attention_mask"]), call
