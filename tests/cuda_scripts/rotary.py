"""Rotary position embeddings as Llama-style models write them (pytorch/examples' llama2_model.py
`apply_rotary_emb`): the query's float pairs seen as complex numbers (`torch.view_as_complex`), times the rotation
frequencies (`torch.polar`), seen as floats again (`torch.view_as_real`), trained a few steps; besides, a float
tensor's bits seen as int32 (`.view(torch.int32)`), a complex tensor's parts written through `view_as_real`, and
conjugates (`.conj()`: torch's lazy conjugate bit; `resolve_conj()`, a product with one, a matrix product with one,
its negative imaginary part `.conj().imag`). Prints `step N loss X` per step and the dtypes and values of the views.

Run: python rotary.py (on the GPU when there is one)"""

import torch
import torch.nn as nn

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


dim, heads, seq = 16, 2, 6
half = dim // heads // 2
angles = torch.outer(torch.arange(seq).float(), 1.0 / (10000 ** (torch.arange(half).float() / half)))
freqs = torch.polar(torch.ones_like(angles), angles).to(device)
proj = nn.Linear(dim, dim).to(device)
opt = torch.optim.AdamW(proj.parameters(), lr=0.05)
x = torch.randn(3, seq, dim).to(device)
for step in range(4):
    q = rotate(proj(x).view(3, seq, heads, dim // heads), freqs)
    loss = (q * q.detach().sin()).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.6f}")
z = torch.view_as_complex(torch.arange(8.0).reshape(4, 2).to(device))
print("complex", z.dtype, [f"{v:.1f}" for v in torch.view_as_real(z * (1 + 1j)).flatten().tolist()])
bits = torch.tensor([1.0, -2.0], device=device).view(torch.int32)
print("bits", bits.dtype, (bits + 0).tolist())
c = torch.zeros(3, dtype=torch.complex64, device=device)
torch.view_as_real(c)[:, 1] = torch.tensor([1.0, 2.0, 3.0], device=device)
print("parts", [f"{v:.1f}" for v in torch.view_as_real(c.conj().resolve_conj()).flatten().tolist()])
w = torch.polar(torch.ones(2, 3), torch.arange(6.0).reshape(2, 3)).to(device)
print("conj", [f"{v:.4f}" for v in torch.view_as_real(w.conj().resolve_conj()).flatten().tolist()])
print("conj product", [f"{v:.4f}" for v in torch.view_as_real(w * w[:, :1].conj()).flatten().tolist()])
print("conj matmul", [f"{v:.4f}" for v in torch.view_as_real(w @ w.conj().T).flatten().tolist()])
print("conj imag", [f"{v:.4f}" for v in (w.conj().imag * 1).flatten().tolist()])
print("done")
