"""specrev48's differential check of the C++ client (`gpupool run`'s default) against the CPU, run as a child process by
tests/integration/test_specrev48.py (argv: a daemon's address and a token): every case computes once on the CPU and
once on the gpupool device and must agree to 1e-6 (a refusal on the device where the CPU computes counts as a
failure). Cases: conjugate and negative views (`.conj()`, `.imag` of one, `torch._neg_view`, `.mH`), `.cpu()` /
`.to('cpu')` of them, copy_ both ways and device to device, the ops torch lets through with the bit (mm, bmm, addmm,
dot, vdot, clone, broadcasting matmul), in-place ops on such views, views of another dtype (`view(int32)`,
`view_as_complex`, `view_as_real`, and views of those, written through), freed storages whose handles had cached
views of another dtype, autograd (a rotary embedding). Prints one JSON object: case -> true, or what went wrong."""

import json
import sys

import torch
from gpupool.client.native import backend as nc
from gpupool.client.session import Session

nc.load()
nc.claim()
nc.connect(Session.attach(sys.argv[1], sys.argv[2], timeout=120.0))
dev = nc.device()
out = {}
torch.manual_seed(0)


def same(a, b):
    a = a.resolve_conj().resolve_neg() if a.device.type == "cpu" else a
    b = b.resolve_conj().resolve_neg()
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def check(name, f):
    try:
        c = f(torch.device("cpu"))
        try:
            g = f(dev)
        except Exception as e:  # a refusal on the device where CPU computes
            out[name] = "DEV RAISED: " + str(e).splitlines()[0][:200]
            return
        if isinstance(c, torch.Tensor):
            c, g = [c], [g]
        ok = all(same(gg.cpu() if gg.device.type != "cpu" else gg, cc) for cc, gg in zip(c, g, strict=True))
        head = [x.cpu().resolve_conj().resolve_neg().flatten()[:4].tolist() for x in g]
        want = [x.resolve_conj().resolve_neg().flatten()[:4].tolist() for x in c]
        out[name] = True if ok else f"WRONG {head} vs {want}"
    except Exception as e:
        out[name] = "CPU RAISED: " + str(e).splitlines()[0][:200]


Z = torch.randn(4, 4, dtype=torch.complex64)
W = torch.randn(4, 4, dtype=torch.complex64)
B = torch.randn(2, 4, 4, dtype=torch.complex64)
X = torch.randn(4, 4)


def z(d):
    return Z.to(d)


def w(d):
    return W.to(d)


# views and .cpu()
check("conj cpu", lambda d: z(d).conj())
check("conj .to(cpu)", lambda d: z(d).conj().to("cpu"))
check("conj imag", lambda d: z(d).conj().imag)
check("conj imag .to(cpu)", lambda d: z(d).conj().imag.to("cpu"))
check(
    "view_as_real conj",
    lambda d: torch.view_as_real(z(d).conj_physical()),
)
check("neg view .cpu", lambda d: torch._neg_view(X.to(d)))
check("neg view of conj", lambda d: torch._neg_view(z(d).conj()))
check("conj slice", lambda d: z(d).conj()[1:3, ::2])
check("conj T", lambda d: z(d).conj().T)
check("mH", lambda d: z(d).mH)
check("adjoint", lambda d: z(d).adjoint())
# ops passing bit through
check("mm conj", lambda d: z(d) @ w(d).conj())
check("mm conj both", lambda d: z(d).conj() @ w(d).conj())
check("mm mH", lambda d: z(d) @ w(d).mH)
check("bmm conj", lambda d: torch.bmm(B.to(d), B.to(d).conj()))
check("addmm conj", lambda d: torch.addmm(z(d).conj(), z(d), w(d).conj()))
check("dot conj", lambda d: torch.dot(z(d)[0].conj(), w(d)[1]))
check("vdot", lambda d: torch.vdot(z(d)[0], w(d)[1]))
check("vdot conj", lambda d: torch.vdot(z(d)[0].conj(), w(d)[1]))
check("clone conj", lambda d: z(d).conj().clone())
check("resolve_conj", lambda d: z(d).conj().resolve_conj())
check("matmul bcast", lambda d: torch.matmul(B.to(d), w(d).conj()))
check("matmul bcast2", lambda d: torch.matmul(B.to(d).conj(), z(d)[0].conj()))
check("mul conj", lambda d: z(d) * w(d).conj())
check("add neg imag", lambda d: X.to(d) + z(d).conj().imag)
check("mm neg imag", lambda d: X.to(d) @ z(d).conj().imag)
check("mm neg view", lambda d: X.to(d) @ torch._neg_view(X.to(d)))
check("sum conj", lambda d: z(d).conj().sum())
check("contiguous conj T", lambda d: z(d).conj().T.contiguous())
check("abs conj", lambda d: z(d).conj().abs())
check("real of conj", lambda d: z(d).conj().real)
check("view_as_real of conj resolved", lambda d: torch.view_as_real(z(d).conj().resolve_conj()))
check("to complex128 conj", lambda d: z(d).conj().to(torch.complex128))
check("to float neg", lambda d: torch._neg_view(X.to(d)).to(torch.float64))


# copies
def cp1(d):
    t = torch.zeros(4, 4, dtype=torch.complex64, device=d)
    t.copy_(z(d).conj())
    return t


check("copy_ dev<-dev conj", cp1)


def cp2(d):
    t = torch.zeros(4, 4, device=d)
    t.copy_(z(d).conj().imag)
    return t


check("copy_ dev<-dev neg imag", cp2)


def cp3(d):
    t = torch.zeros(4, 4, dtype=torch.complex64)
    t.copy_(z(d).conj().T)
    return t


check("copy_ cpu<-dev conj T", cp3)


def cp4(d):
    t = torch.zeros(4, 4, dtype=torch.complex64, device=d)
    t.copy_(Z.conj().T)
    return t


check("copy_ dev<-cpu conj T", cp4)


def cp5(d):
    t = torch.zeros(4, 4, dtype=torch.complex64, device=d)
    t.conj().copy_(Z)
    return t


check("copy_ into conj view", cp5)


# in-place on conj/neg views
def ip1(d):
    t = z(d).clone()
    t.conj().mul_(2)
    return t


check("inplace mul_ conj view", ip1)


def ip2(d):
    t = z(d).clone()
    t.conj().add_(w(d))
    return t


check("inplace add_ conj view", ip2)


def ip3(d):
    t = z(d).clone()
    t.conj().imag.add_(1)
    return t


check("inplace add_ conj imag", ip3)


def ip4(d):
    t = z(d).clone()
    u = torch.zeros(4, 4, dtype=torch.complex64, device=d)
    u.add_(t.conj())
    return u


check("inplace add_ from conj", ip4)


def ip5(d):
    t = z(d).clone()
    t.imag.zero_()
    return t


check("imag zero_", ip5)


def ip6(d):
    t = z(d).clone()
    t.conj().zero_()
    return t


check("conj zero_", ip6)


def ip7(d):
    t = z(d).clone()
    t.conj()[0].fill_(1 + 2j)
    return t


check("conj fill_", ip7)
# views of other dtype
check("view int32", lambda d: X.to(d).view(torch.int32))
check("view int32 slice", lambda d: X.to(d).view(torch.int32)[1:, 2])
check("view int32 T", lambda d: X.to(d).view(torch.int32).T + 1)
check("view_as_complex", lambda d: torch.view_as_complex(X.to(d)[:, :].reshape(4, 2, 2)))
check("view_as_complex slice", lambda d: torch.view_as_complex(X.to(d).reshape(4, 2, 2))[1:3])
check("view_as_real", lambda d: torch.view_as_real(z(d)))
check("view_as_real T", lambda d: torch.view_as_real(z(d)).transpose(0, 1))
check("view_as_real slice", lambda d: torch.view_as_real(z(d))[1:, :, 1])
check("view_as_real of slice", lambda d: torch.view_as_real(z(d)[1:, 1:]))
check("view int16", lambda d: X.to(d).view(torch.int16)[:, 3:])
check("view uint8 of int32 view", lambda d: X.to(d).view(torch.int32).view(torch.uint8)[2])
check("view float64", lambda d: X.to(d).view(torch.float64))
check("view float64 of offset", lambda d: X.to(d)[1].view(torch.float64))
check("view bfloat16", lambda d: X.to(d).view(torch.bfloat16).float())


def wv1(d):
    t = X.to(d).clone()
    t.view(torch.int32)[1].zero_()
    return t


check("write via int32 view", wv1)


def wv2(d):
    t = z(d).clone()
    torch.view_as_real(t)[..., 1].zero_()
    return t


check("write via view_as_real", wv2)


def wv3(d):
    t = X.to(d).clone()
    torch.view_as_complex(t.view(4, 2, 2))[2].mul_(1j)
    return t


check("write via view_as_complex", wv3)


def wv4(d):
    t = X.to(d).clone()
    t.view(torch.int32).T[1:3, 0].fill_(7)
    return t


check("write via int32 T", wv4)


def wv5(d):
    t = X.to(d).clone()
    t[1:].view(torch.int32)[0].fill_(7)
    return t


check("write via offset int32", wv5)


# freed storages with cached retyped handles
def fr(d):
    res = []
    for i in range(60):
        a = torch.full((8, 8), float(i), device=d)
        v = a.view(torch.int32)[i % 8]
        res.append(v.clone())
        del a, v
    return torch.stack(res)


check("freed retyped reuse", fr)


def fr2(d):
    res = []
    for i in range(60):
        a = torch.full((16,), float(i), device=d)
        c = torch.view_as_complex(a.view(8, 2))
        res.append(c[1:].clone())
        del a, c
        b = torch.full((16,), float(-i), device=d)
        res.append(torch.view_as_complex(b.view(8, 2))[:3].clone())
        del b
    return torch.stack([r[:3] for r in res])


check("freed retyped reuse 2", fr2)


# autograd: rotary embedding
def rope(d):
    torch.manual_seed(1)
    q = torch.randn(2, 6, 4, 8, requires_grad=True)
    fr = torch.polar(torch.ones(6, 4), torch.randn(6, 4))
    qd = q.detach().to(d).requires_grad_(True)
    qc = torch.view_as_complex(qd.float().reshape(2, 6, 4, 4, 2))
    o = torch.view_as_real(qc * fr.to(d).view(1, 6, 1, 4)).flatten(3)
    loss = (o * o.sin()).sum()
    loss.backward()
    return [o.detach(), qd.grad]


check("rope grad", rope)


def cgrad(d):
    a = Z.clone().to(d).requires_grad_(True)
    b = W.clone().to(d).requires_grad_(True)
    loss = (a @ b.conj()).abs().sum() + (a.conj() * b).real.sum() + torch.vdot(a[0], b[1]).real
    loss.backward()
    return [a.grad, b.grad]


check("complex grads", cgrad)


def cgrad2(d):
    a = Z.clone().to(d).requires_grad_(True)
    loss = (
        torch.view_as_real(a.conj().resolve_conj()).pow(3).sum() + a.conj().imag.sum() + (a.conj() @ a.mH).abs().sum()
    )
    loss.backward()
    return [a.grad]


check("complex grads view_as_real conj", cgrad2)


def ip8(d):
    t = z(d).clone()
    torch._neg_view(t).add_(1)
    return t


check("neg view add_", ip8)


def ip9(d):
    t = z(d).clone()
    t.conj().T[1:3].copy_(W[:2].to(d).conj())
    return t


check("conj T slice copy_ conj", ip9)


def ip10(d):
    t = torch.zeros(4, 4, dtype=torch.complex64)
    t.conj().copy_(z(d))
    return t


check("cpu conj view <- dev", ip10)


def ip11(d):
    t = z(d).clone()
    c = t.conj()
    c.mul_(2)
    return [t, c]


check("conj mul_ both views", ip11)


def ag_ip(d):
    a = Z.clone().to(d).requires_grad_(True)
    t = a * 1
    t.conj().mul_(W.to(d))
    loss = t.abs().sum()
    loss.backward()
    return [t.detach(), a.grad]


check("autograd through conj inplace", ag_ip)
print(json.dumps(out))
