"""Transformer inference as an evaluation loop writes it: `nn.MultiheadAttention` and `nn.TransformerEncoder`
(batch_first, an even number of heads) in `eval()` under `torch.no_grad()`, without and with a key padding mask:
the conditions under which torch takes its "fast path" (`_native_multi_head_attention`,
`_transformer_encoder_layer_fwd`, a nested tensor for the padding mask). Prints one `step N <what> loss X` line per
value, 8 digits; with a padding mask the positions the mask keeps, and the encoder's whole output (torch's
nested-tensor path writes zeros at the padded positions, then the final norm: with a LayerNorm, its bias there).
Without CUDA it runs on the CPU."""

import torch
import torch.nn as nn

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
step = 0


def report(what: str, value: torch.Tensor) -> None:
    global step
    print(f"step {step} {what} loss {float(value):.8g}", flush=True)
    step += 1


mha = nn.MultiheadAttention(16, 4, batch_first=True).to(device).eval()
layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).to(device).eval()
layer = layer.to(device).eval()  # (the encoder holds copies)
normed = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16)).eval()
with torch.no_grad():
    normed.norm.bias.copy_(torch.linspace(-1, 1, 16))  # (what a padded position holds: the norm of zeros)
normed = normed.to(device)
x = torch.randn(3, 5, 16).to(device)
pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]]).to(device)
keep = (~pad).unsqueeze(-1).float()

with torch.no_grad():
    for _ in range(2):
        out, _ = mha(x, x, x, need_weights=False)
        report("mha", out.sum())
        out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        report("mha padded", (out * keep).sum())
        report("encoder", encoder(x).abs().sum())  # (a LayerNorm last: each row sums to 0)
        report("encoder padded", (encoder(x, src_key_padding_mask=pad) * keep).abs().sum())
        report("encoder padded whole", encoder(x, src_key_padding_mask=pad).abs().sum())
        report("normed padded whole", normed(x, src_key_padding_mask=pad).abs().sum())
        report("layer", layer(x).abs().sum())
        x = x * 0.5
print("transformer eval done on", device.type)
