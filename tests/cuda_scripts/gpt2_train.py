"""A HuggingFace-style GPT-2 fine-tuning loop, hand-written (`transformers` is not installed here) the way
transformers' modeling_gpt2.py and its `Trainer` do it: Conv1D projections (`torch.addmm(bias, x.view(-1, nx),
weight)`), causal `F.scaled_dot_product_attention` with a padding mask, `gelu_new` (`F.gelu(approximate="tanh")`),
LayerNorm, learned position embeddings, the LM head tied to the token embedding (`lm_head.weight =
wte.weight`, as `tie_weights()` does) and moved with `model.cuda()`, labels shifted inside the loss with
`ignore_index=-100` on padding, AdamW with a no-decay group for biases and LayerNorms, a linear warmup schedule
(`LambdaLR`), `torch.cuda.amp.autocast()` + `torch.cuda.amp.GradScaler()` with `unscale_` before `clip_grad_norm_`
(`--fp16`, as `Trainer(fp16=True)`), `zero_grad(set_to_none=True)`, an evaluation under `torch.no_grad()`, a
`state_dict()` checkpoint reloaded with `map_location="cuda"`, and greedy generation with a growing input. Without
CUDA it takes the CPU branch (AMP off)."""

import argparse
import math
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.* is deprecated in favour of torch.amp

parser = argparse.ArgumentParser()
parser.add_argument("--fp16", action="store_true")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
use_amp = args.fp16 and device.type == "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(42)
torch.cuda.manual_seed_all(42)


@dataclass
class GPT2Config:
    vocab_size: int = 96
    n_positions: int = 32
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with its weight transposed."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_dim, self.num_heads = config.n_embd, config.n_head
        self.head_dim = self.embed_dim // self.num_heads
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, attention_mask=None):
        bsz, q_len, _ = hidden_states.size()
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        shape = (bsz, q_len, self.num_heads, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        # transformers' sdpa_attention_forward: a 4-D boolean mask where padding is; is_causal otherwise
        attn_output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=attention_mask is None and q_len > 1,
        )
        attn_output = attn_output.transpose(1, 2).reshape(bsz, q_len, self.embed_dim).contiguous()
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2MLP(nn.Module):
    def __init__(self, intermediate_size, config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        hidden_states = F.gelu(self.c_fc(hidden_states), approximate="tanh")  # ACT2FN["gelu_new"]
        return self.dropout(self.c_proj(hidden_states))


class GPT2Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(4 * config.n_embd, config)

    def forward(self, hidden_states, attention_mask=None):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        self.lm_head.weight = self.wte.weight  # tie_weights()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def forward(self, input_ids, attention_mask=None, labels=None):
        bsz, seq = input_ids.shape
        position_ids = torch.arange(seq, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        mask4d = None
        if attention_mask is not None:  # causal and padding, as _prepare_4d_causal_attention_mask_for_sdpa
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
            mask4d = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
            mask4d = mask4d | ~mask4d.any(-1, keepdim=True)  # fully masked rows (left padding) attend everywhere
        for block in self.h:
            hidden_states = block(hidden_states, mask4d)
        logits = self.lm_head(self.ln_f(hidden_states))
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().float()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(
                shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100
            )
        return loss, logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens):
        for _ in range(max_new_tokens):
            _, logits = self(input_ids[:, -self.config.n_positions :])
            next_tokens = torch.argmax(logits[:, -1, :], dim=-1)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        return input_ids


config = GPT2Config()
model = GPT2LMHeadModel(config)
model.cuda() if device.type == "cuda" else model.to(device)
assert model.lm_head.weight is model.wte.weight

# a seeded stand-in for a tokenized dataset: right-padded sequences, labels -100 on padding (DataCollator's way)
g = torch.Generator().manual_seed(3)
input_ids = torch.randint(1, config.vocab_size, (8, 24), generator=g)
lengths = torch.tensor([24, 20, 24, 17, 24, 22, 24, 12])
attention_mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
input_ids = input_ids.masked_fill(attention_mask == 0, 0)
labels = input_ids.masked_fill(attention_mask == 0, -100)

no_decay = ["bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"]
groups = [
    {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
    {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
]
optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
warmup = 2
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (args.steps - step) / args.steps)
)
scaler = torch.cuda.amp.GradScaler(enabled=use_amp)

model.train()
for step in range(args.steps):
    for start in (0, 4):  # two micro-batches of 4, gradient accumulation
        batch = slice(start, start + 4)
        ids, mask, lab = (t[batch].to(device, non_blocking=True) for t in (input_ids, attention_mask, labels))
        with torch.cuda.amp.autocast(enabled=use_amp):
            loss, _ = model(ids, attention_mask=mask, labels=lab)
            loss = loss / 2
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    print(
        f"step {step} lr {scheduler.get_last_lr()[0]:.6f} grad norm {grad_norm.item():.8f} loss {loss.item() * 2:.8f}"
    )

model.eval()
with torch.no_grad():
    eval_loss, _ = model(input_ids.to(device), labels=labels.to(device))  # no mask: is_causal
print(f"eval loss {eval_loss.item():.8f} perplexity {math.exp(eval_loss.item()):.6f}")

path = os.path.join(tempfile.mkdtemp(), "pytorch_model.bin")
torch.save(model.state_dict(), path)
reloaded = GPT2LMHeadModel(config)
reloaded.load_state_dict(torch.load(path, map_location=device.type))  # "cuda" or "cpu"
reloaded.to(device).eval()
assert reloaded.lm_head.weight is reloaded.wte.weight
tokens = reloaded.generate(input_ids[:2, :6].to(device), max_new_tokens=8)
print("generated", tokens[:, 6:].tolist(), "on", "cuda" if tokens.is_cuda else "cpu")
print(
    f"tied {model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()} wte sum {model.wte.weight.sum().item():.6f}"
)
