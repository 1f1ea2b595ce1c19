"""Training idioms of ordinary CUDA code that no earlier script ran, in one seeded script: weight normalization
(`nn.utils.parametrizations.weight_norm` on a conv, the older `nn.utils.weight_norm` on a linear layer's last dim, as
WaveNet-, HiFi-GAN- and wav2vec-style models use them), `spectral_norm` and `orthogonal` parametrizations, activation
checkpointing (`torch.utils.checkpoint`, reentrant and not), per-sample gradients with `torch.func`
(`functional_call`, `vmap`, `grad`), forward-mode AD (`jvp`, `jacfwd`, `hessian`), a policy's `torch.distributions`
(Normal, Categorical, Gamma, Beta: `rsample`, `sample`, `log_prob`, `entropy`, argument validation on), an EMA of the
weights (`torch._foreach_lerp_`, `swa_utils.AveragedModel`), `clip_grad_value_`, `zero_grad(set_to_none=False)`,
OneCycleLR and CosineAnnealingWarmRestarts. Prints one `step N <what> loss X` line per value, 8 digits. Without CUDA
it runs on the CPU."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributions as D
from torch.func import functional_call, grad, hessian, jacfwd, jvp, vmap
from torch.nn.utils import parametrizations as P
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
step = 0


def report(what: str, value: torch.Tensor | float) -> None:
    global step
    value = value.detach() if isinstance(value, torch.Tensor) else value
    print(f"step {step} {what} loss {float(value):.8g}", flush=True)
    step += 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = P.weight_norm(nn.Conv1d(4, 8, 3, padding=1))  # dim 0: g per output channel
        self.block = nn.Sequential(nn.Linear(8 * 6, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh())
        self.mid = P.spectral_norm(nn.Linear(32, 32))
        self.rot = P.orthogonal(nn.Linear(32, 32, bias=False))
        self.head = nn.utils.weight_norm(nn.Linear(32, 5), dim=1)  # the older API, the last dim
        self.value = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, reentrant: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv(x)).flatten(1)
        h = checkpoint(self.block, h, use_reentrant=reentrant)
        h = self.rot(F.relu(self.mid(h)))
        return self.head(h), self.value(h).squeeze(-1)


x = torch.randn(16, 4, 6).to(device)
y = torch.randint(0, 5, (16,)).to(device)
returns = torch.randn(16).to(device)
model = Net().to(device)
ema = AveragedModel(model.block, multi_avg_fn=get_ema_multi_avg_fn(0.9))
shadow = [p.detach().clone() for p in model.parameters()]
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8)

for it in range(4):
    opt.zero_grad(set_to_none=False)
    logits, value = model(x, reentrant=it % 2 == 0)
    policy = D.Categorical(logits=logits)
    actions = policy.sample()  # the device's draw: only its shape and range are compared
    assert actions.shape == y.shape and int(actions.min()) >= 0 and int(actions.max()) < 5
    log_prob = policy.log_prob(y)
    noise = D.Normal(value, torch.ones_like(value))
    loss = -(log_prob * returns).mean() - 0.01 * policy.entropy().mean() - noise.log_prob(returns).mean()
    loss = loss + F.cross_entropy(logits, y)
    loss.backward()
    nn.utils.clip_grad_value_(model.parameters(), 0.5)
    report("train", loss)
    report("weight_norm g grad", model.conv.parametrizations.weight.original0.grad.sum())
    report("weight_norm v grad", model.head.weight_v.grad.sum())
    opt.step()
    sched.step()
    ema.update_parameters(model.block)  # (deepcopy refuses a module of the older weight_norm)
    with torch.no_grad():
        torch._foreach_lerp_(shadow, [p.detach() for p in model.parameters()], 0.1)
    report("lr", opt.param_groups[0]["lr"])

report("ema", sum(p.double().sum() for p in ema.parameters()))
report("foreach_lerp ema", sum(p.double().sum() for p in shadow))
report("weight_norm w", model.conv.weight.sum())
report("spectral_norm w", model.mid.weight.sum())

# torch.func: per-sample gradients of a small head (functional_call + vmap + grad)
torch.manual_seed(1)  # the policy drew its actions from the CPU generator on the CPU, the device's on a GPU
head = nn.Linear(32, 5).to(device)
params = {k: v.detach() for k, v in head.named_parameters()}
feats = torch.randn(16, 32).to(device)


def sample_loss(p: dict[str, torch.Tensor], f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(head, p, (f.unsqueeze(0),)), t.unsqueeze(0))


per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, feats, y)
assert per_sample["weight"].shape == (16, 5, 32)
report("per-sample grad norm", per_sample["weight"].flatten(1).norm(dim=1).sum())

# Gamma (the reparameterized sampler) and log_prob on the device
concentration = torch.tensor([0.5, 2.0, 5.0], device=device, requires_grad=True)
gamma = D.Gamma(concentration, torch.tensor([1.0, 2.0, 0.5], device=device))
draws = gamma.rsample((64,))
assert draws.shape == (64, 3) and bool((draws > 0).all())
draws.mean().backward()
assert concentration.grad is not None and bool(torch.isfinite(concentration.grad).all())
report("gamma log_prob", gamma.log_prob(torch.tensor([0.3, 1.1, 9.0], device=device)).sum())
report("gamma entropy", gamma.entropy().sum())
alpha = torch.tensor([2.0, 0.5], device=device, requires_grad=True)
beta = D.Beta(alpha, torch.tensor([3.0, 1.5], device=device))  # Dirichlet underneath
draws = beta.rsample((32,))
assert draws.shape == (32, 2) and bool(((draws > 0) & (draws < 1)).all())
draws.mean().backward()
assert alpha.grad is not None and bool(torch.isfinite(alpha.grad).all())
report("beta log_prob", beta.log_prob(torch.tensor([0.3, 0.6], device=device)).sum())

# CosineAnnealingWarmRestarts, fractional epochs (its documented per-batch use)
opt2 = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
warm = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt2, T_0=2, T_mult=2)
for i in range(5):
    opt2.zero_grad()
    loss = F.cross_entropy(head(feats), y)
    loss.backward()
    opt2.step()
    warm.step(i + 0.5)
    report("warm restarts", loss)
report("warm restarts lr", opt2.param_groups[0]["lr"])

# forward-mode AD (zero tangents for the weights: aten::_efficientzerotensor): jvp, jacfwd, torch.func.hessian
# (forward over reverse) by input and by weights, torch.autograd.functional.hessian's forward-mode outer jacobian
torch.manual_seed(2)  # (the samplers above drew from the device's generator on a GPU, the CPU's here)
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(device)
weights = {k: v.detach() for k, v in net.named_parameters()}
point = torch.randn(4).to(device)


def scalar(inp: torch.Tensor) -> torch.Tensor:
    return functional_call(net, weights, (inp,)).sum()


def weight_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return functional_call(net, p, (point,)).pow(2).sum()


report("jvp", jvp(scalar, (point,), (torch.ones_like(point),))[1])
report("jacfwd", jacfwd(scalar)(point).abs().sum())
report("hessian", hessian(scalar)(point).abs().sum())
report("hessian of weights", sum(h.abs().sum() for row in hessian(weight_loss)(weights).values() for h in row.values()))
outer = torch.autograd.functional.hessian(scalar, point, vectorize=True, outer_jacobian_strategy="forward-mode")
report("autograd hessian forward-mode", outer.abs().sum())
print("training idioms done on", device.type)
