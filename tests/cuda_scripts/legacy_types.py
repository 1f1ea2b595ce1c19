"""A GAN training loop in the style of the PyTorch-GAN scripts (eriklindernoren/PyTorch-GAN, gan.py and its
siblings), which pick a legacy tensor type once: `Tensor = torch.cuda.FloatTensor if cuda else torch.FloatTensor`,
then `Variable(Tensor(imgs.size(0), 1).fill_(1.0))`, `Variable(imgs.type(Tensor))`, `Tensor(np.random.normal(...))`;
plus the older calls around it: `torch.set_default_tensor_type("torch.cuda.FloatTensor")`, `x.type()` names,
`isinstance(x, torch.cuda.FloatTensor)`, `torch.cuda.initial_seed()`, `torch.cuda.StreamContext`,
`torch.cuda.set_stream`.

Prints `step N <what> loss X` lines (the same values on the CPU, where it takes the CPU types) and `FAIL <what>` for
each check that does not hold (none where it runs as on a GPU)."""

import numpy as np
import torch
import torch.nn as nn
from torch.autograd import Variable

cuda = torch.cuda.is_available()
torch.manual_seed(0)
np.random.seed(0)
Tensor = torch.cuda.FloatTensor if cuda else torch.FloatTensor
LongTensor = torch.cuda.LongTensor if cuda else torch.LongTensor


def check(what, ok):
    if not ok:
        print(f"FAIL {what}", flush=True)


latent, size, n = 8, 16, 12
generator = nn.Sequential(nn.Linear(latent, 32), nn.LeakyReLU(0.2), nn.Linear(32, size), nn.Tanh())
discriminator = nn.Sequential(nn.Linear(size, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())
adversarial_loss = torch.nn.BCELoss()
if cuda:
    generator.cuda()
    discriminator.cuda()
    adversarial_loss.cuda()
optimizer_g = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
data = torch.from_numpy(np.random.uniform(-1, 1, (4, n, size))).double()  # float64 "images", as a loader gives uint8

for step, imgs in enumerate(data):
    valid = Variable(Tensor(imgs.size(0), 1).fill_(1.0), requires_grad=False)
    fake = Variable(Tensor(imgs.size(0), 1).fill_(0.0), requires_grad=False)
    real_imgs = Variable(imgs.type(Tensor))
    optimizer_g.zero_grad()
    z = Variable(Tensor(np.random.normal(0, 1, (imgs.shape[0], latent))))
    gen_imgs = generator(z)
    g_loss = adversarial_loss(discriminator(gen_imgs), valid)
    g_loss.backward()
    optimizer_g.step()
    optimizer_d.zero_grad()
    real_loss = adversarial_loss(discriminator(real_imgs), valid)
    fake_loss = adversarial_loss(discriminator(gen_imgs.detach()), fake)
    d_loss = (real_loss + fake_loss) / 2
    d_loss.backward()
    optimizer_d.step()
    print(f"step {step} g loss {g_loss.item():.8g}", flush=True)
    print(f"step {step} d loss {d_loss.item():.8g}", flush=True)

labels = LongTensor([1, 0, 2])
print(f"step 4 labels loss {float(labels.sum()):.8g}", flush=True)
if cuda:
    check("legacy constructor device", real_imgs.is_cuda and valid.is_cuda and labels.is_cuda and z.is_cuda)
    check(
        "legacy constructor dtypes",
        (valid.dtype, labels.dtype, real_imgs.dtype) == (torch.float32, torch.int64, torch.float32),
    )
    check("x.type()", real_imgs.type() == "torch.cuda.FloatTensor" and labels.type() == "torch.cuda.LongTensor")
    check("isinstance", isinstance(real_imgs, Tensor) and not isinstance(labels, torch.cuda.FloatTensor))
    check("type by name", real_imgs.type("torch.cuda.HalfTensor").dtype == torch.float16)
    check("back to the CPU", real_imgs.type(torch.DoubleTensor).device.type == "cpu")
    check("empty", Tensor().shape == (0,) and Tensor(torch.Size([2, 3])).shape == (2, 3))
    check("initial_seed", torch.cuda.initial_seed() == 0)
    torch.cuda.manual_seed(5)
    check("initial_seed after cuda.manual_seed", torch.cuda.initial_seed() == 5)
    s = torch.cuda.Stream()
    with torch.cuda.StreamContext(s):
        w = valid * 2
    torch.cuda.set_stream(torch.cuda.default_stream())
    check("StreamContext", float(w.sum()) == 2.0 * n)
    torch.set_default_tensor_type("torch.cuda.FloatTensor")
    made = torch.zeros(3)
    check("set_default_tensor_type(cuda)", made.is_cuda and made.dtype == torch.float32)
    torch.set_default_tensor_type(torch.FloatTensor)
    check("set_default_tensor_type(cpu)", not torch.zeros(3).is_cuda)
print("done", flush=True)
