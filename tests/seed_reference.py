"""The tutorial's original model, train step and generate_text, kept only so the regression
tests can show that they fail on it (and therefore guard the fixes in simplegpt)."""

import torch
import torch.nn as nn


class SeedGPTBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = nn.MultiheadAttention(config.n_embd, config.n_head, dropout=config.attn_pdrop)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.resid_pdrop),
        )

    def forward(self, x, attention_mask=None):
        attn_output, _ = self.attn(x, x, x, attn_mask=attention_mask)
        x = x + attn_output
        x = self.ln_1(x)
        mlp_output = self.mlp(x)
        x = x + mlp_output
        x = self.ln_2(x)
        return x


class SeedSimpleGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([SeedGPTBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.config = config

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(0, input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x = self.drop(x)
        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1).repeat(self.config.n_head, attention_mask.size(1), 1)
            attention_mask = attention_mask.to(dtype=torch.float32)
            attention_mask = (1.0 - attention_mask) * -10000.0
        for block in self.blocks:
            x = block(x.transpose(0, 1), attention_mask)
            x = x.transpose(0, 1)
        x = self.ln_f(x)
        logits = self.head(x)
        return logits


def seed_loss(model, input_ids, attention_mask):
    """The tutorial's loss: every shifted token counts, padding included."""
    outputs = model(input_ids, attention_mask)
    shift_logits = outputs[..., :-1, :].contiguous()
    shift_labels = input_ids[..., 1:].contiguous()
    return nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def seed_generate(model, prompt_ids, max_length=50):
    """The tutorial's generate_text on token ids: the sequence is never cropped."""
    generated = torch.tensor([prompt_ids])
    for _ in range(max_length):
        outputs = model(generated)
        next_token = torch.argmax(outputs[:, -1, :], dim=-1).unsqueeze(0)
        generated = torch.cat((generated, next_token), dim=1)
    return generated[0].tolist()
