"""pytorch/examples' super_resolution (77f55b9; BSD-3: LICENSE.pytorch-examples): main.py and model.py nearly
unmodified (the sub-pixel CNN: four convolutions with orthogonal init, `nn.PixelShuffle`; MSELoss, Adam, a shuffled
DataLoader with `--threads` workers, the PSNR of each test batch, `torch.save(model, path)` of the whole model each
epoch), then super_resolve.py's reload (`torch.load(path, weights_only=False)`, `model.to(device)`) and one image
upscaled. Changed for the test: seeded random low/high resolution pairs stand in for BSDS300 (a download), the
losses are printed in full, smaller defaults."""

import argparse
import os
import tempfile
from math import log10

import torch
import torch.nn as nn
import torch.nn.init as init
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self, upscale_factor):
        super().__init__()

        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 64, (5, 5), (1, 1), (2, 2))
        self.conv2 = nn.Conv2d(64, 64, (3, 3), (1, 1), (1, 1))
        self.conv3 = nn.Conv2d(64, 32, (3, 3), (1, 1), (1, 1))
        self.conv4 = nn.Conv2d(32, upscale_factor**2, (3, 3), (1, 1), (1, 1))
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)

        self._initialize_weights()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        x = self.pixel_shuffle(self.conv4(x))
        return x

    def _initialize_weights(self):
        init.orthogonal_(self.conv1.weight, init.calculate_gain("relu"))
        init.orthogonal_(self.conv2.weight, init.calculate_gain("relu"))
        init.orthogonal_(self.conv3.weight, init.calculate_gain("relu"))
        init.orthogonal_(self.conv4.weight)


def pairs(n, upscale_factor, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 1, 8 * upscale_factor, 8 * upscale_factor, generator=g)
    return TensorDataset(nn.functional.avg_pool2d(target, upscale_factor), target)


# Training settings
parser = argparse.ArgumentParser(description="PyTorch Super Res Example")
parser.add_argument("--upscale_factor", type=int, default=2, help="super resolution upscale factor")
parser.add_argument("--batchSize", type=int, default=4, help="training batch size")
parser.add_argument("--testBatchSize", type=int, default=4, help="testing batch size")
parser.add_argument("--nEpochs", type=int, default=2, help="number of epochs to train for")
parser.add_argument("--lr", type=float, default=0.01, help="Learning Rate. Default=0.01")
parser.add_argument("--accel", action="store_true", help="Enables acceleration for training, if available")
parser.add_argument("--threads", type=int, default=2, help="number of threads for data loader to use")
parser.add_argument("--seed", type=int, default=123, help="random seed to use. Default=123")
opt = parser.parse_args()

torch.manual_seed(opt.seed)

if opt.accel and torch.accelerator.is_available():
    device = torch.accelerator.current_accelerator()
else:
    device = torch.device("cpu")

print("===> Loading datasets")
train_set = pairs(12, opt.upscale_factor, 1)
test_set = pairs(8, opt.upscale_factor, 2)
training_data_loader = DataLoader(dataset=train_set, num_workers=opt.threads, batch_size=opt.batchSize, shuffle=True)
testing_data_loader = DataLoader(dataset=test_set, num_workers=opt.threads, batch_size=opt.testBatchSize, shuffle=False)

print("===> Building model")
model = Net(upscale_factor=opt.upscale_factor).to(device)
criterion = nn.MSELoss()

optimizer = optim.Adam(model.parameters(), lr=opt.lr)
out_dir = tempfile.mkdtemp()


def train(epoch):
    epoch_loss = 0
    for iteration, batch in enumerate(training_data_loader, 1):
        input, target = batch[0].to(device), batch[1].to(device)

        optimizer.zero_grad()
        loss = criterion(model(input), target)
        epoch_loss += loss.item()
        loss.backward()
        optimizer.step()

        print(f"step {epoch}.{iteration} loss {loss.item():.8f}")

    print(f"===> Epoch {epoch} Complete: Avg. Loss: {epoch_loss / len(training_data_loader):.4f}")


def test():
    avg_psnr = 0
    with torch.no_grad():
        for batch in testing_data_loader:
            input, target = batch[0].to(device), batch[1].to(device)

            prediction = model(input)
            mse = criterion(prediction, target)
            psnr = 10 * log10(1 / mse.item())
            avg_psnr += psnr
    print(f"psnr {avg_psnr / len(testing_data_loader):.6f}")


def checkpoint(epoch):
    model_out_path = os.path.join(out_dir, f"model_epoch_{epoch}.pth")
    torch.save(model, model_out_path)
    print(f"Checkpoint saved to model_epoch_{epoch}.pth")
    return model_out_path


for epoch in range(1, opt.nEpochs + 1):
    train(epoch)
    test()
    path = checkpoint(epoch)

# super_resolve.py
loaded = torch.load(path, weights_only=False)
if opt.accel:
    loaded = loaded.to(device)
low = test_set[0][0].unsqueeze(0)
out = loaded(low.to(device)).cpu()
print(f"upscaled {tuple(out.shape)} {out.sum().item():.6f}")
