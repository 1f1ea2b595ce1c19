"""pytorch/examples' fast_neural_style (77f55b9; BSD-3: LICENSE.pytorch-examples): neural_style.py's training loop,
transformer_net.py's layers (ConvLayer with ReflectionPad2d, InstanceNorm2d, a ResidualBlock, UpsampleConvLayer's
`F.interpolate(mode="nearest")`) and utils.py's `gram_matrix` and `normalize_batch` (`div_` in place, `new_tensor`),
narrower (8 and 16 channels, one residual block); its checkpoint idiom mid-training: `transformer.eval().cpu()`,
`torch.save(state_dict)`, `transformer.to(device).train()`, with the Adam optimizer kept. Changed for the test: a
frozen two-stage conv net of seeded weights stands in for VGG16's pretrained features (a download), seeded random
images for the dataset and the style image, the losses printed in full. Until round 38 `upsample_nearest2d` and
`reflection_pad2d` were not on the daemon's allowlist: denied at the first step."""

import os
import tempfile
from collections import namedtuple

import torch
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset


class ConvLayer(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride):
        super().__init__()
        reflection_padding = kernel_size // 2
        self.reflection_pad = torch.nn.ReflectionPad2d(reflection_padding)
        self.conv2d = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        return self.conv2d(self.reflection_pad(x))


class ResidualBlock(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in1 = torch.nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in2 = torch.nn.InstanceNorm2d(channels, affine=True)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        residual = x
        out = self.relu(self.in1(self.conv1(x)))
        out = self.in2(self.conv2(out))
        return out + residual


class UpsampleConvLayer(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, upsample=None):
        super().__init__()
        self.upsample = upsample
        reflection_padding = kernel_size // 2
        self.reflection_pad = torch.nn.ReflectionPad2d(reflection_padding)
        self.conv2d = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        x_in = x
        if self.upsample:
            x_in = torch.nn.functional.interpolate(x_in, mode="nearest", scale_factor=self.upsample)
        out = self.reflection_pad(x_in)
        return self.conv2d(out)


class TransformerNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvLayer(3, 8, kernel_size=9, stride=1)
        self.in1 = torch.nn.InstanceNorm2d(8, affine=True)
        self.conv2 = ConvLayer(8, 16, kernel_size=3, stride=2)
        self.in2 = torch.nn.InstanceNorm2d(16, affine=True)
        self.res1 = ResidualBlock(16)
        self.deconv1 = UpsampleConvLayer(16, 8, kernel_size=3, stride=1, upsample=2)
        self.in4 = torch.nn.InstanceNorm2d(8, affine=True)
        self.deconv3 = ConvLayer(8, 3, kernel_size=9, stride=1)
        self.relu = torch.nn.ReLU()

    def forward(self, X):
        y = self.relu(self.in1(self.conv1(X)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.res1(y)
        y = self.relu(self.in4(self.deconv1(y)))
        return self.deconv3(y)


class Features(torch.nn.Module):
    """vgg.py's Vgg16 shape (slices returning a namedtuple, requires_grad=False), two stages of seeded weights."""

    def __init__(self, requires_grad=False):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.slice1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.slice2 = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if not requires_grad:
            for param in self.parameters():
                param.requires_grad = False

    def forward(self, X):
        h_relu1_2 = self.slice1(X)
        h_relu2_2 = self.slice2(h_relu1_2)
        return namedtuple("VggOutputs", ["relu1_2", "relu2_2"])(h_relu1_2, h_relu2_2)


def gram_matrix(y):
    (b, ch, h, w) = y.size()
    features = y.view(b, ch, w * h)
    features_t = features.transpose(1, 2)
    return features.bmm(features_t) / (ch * h * w)


def normalize_batch(batch):
    mean = batch.new_tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = batch.new_tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    batch = batch.div_(255.0)
    return (batch - mean) / std


def train():
    accel = torch.accelerator.is_available()
    device = torch.accelerator.current_accelerator() if accel else torch.device("cpu")
    torch.manual_seed(42)
    g = torch.Generator().manual_seed(5)
    train_dataset = TensorDataset(torch.rand(8, 3, 16, 16, generator=g) * 255, torch.zeros(8))
    train_loader = DataLoader(train_dataset, batch_size=4)
    transformer = TransformerNet().to(device)
    optimizer = Adam(transformer.parameters(), 1e-3)
    mse_loss = torch.nn.MSELoss()
    vgg = Features(requires_grad=False).to(device)
    style = (torch.rand(3, 16, 16, generator=g) * 255).repeat(4, 1, 1, 1).to(device)
    features_style = vgg(normalize_batch(style))
    gram_style = [gram_matrix(y) for y in features_style]
    content_weight, style_weight, checkpoint_dir = 1e5, 1e10, tempfile.mkdtemp()
    for e in range(2):
        transformer.train()
        for batch_id, (x, _) in enumerate(train_loader):
            n_batch = len(x)
            optimizer.zero_grad()
            x = x.to(device)
            y = transformer(x)
            y = normalize_batch(y)
            x = normalize_batch(x)
            features_y = vgg(y)
            features_x = vgg(x)
            content_loss = content_weight * mse_loss(features_y.relu2_2, features_x.relu2_2)
            style_loss = 0.0
            for ft_y, gm_s in zip(features_y, gram_style, strict=True):
                gm_y = gram_matrix(ft_y)
                style_loss += mse_loss(gm_y, gm_s[:n_batch, :, :])
            style_loss *= style_weight
            total_loss = content_loss + style_loss
            total_loss.backward()
            optimizer.step()
            print(f"step {e}.{batch_id} content {content_loss.item():.6f} style {style_loss.item():.6f} "
                  f"loss {total_loss.item():.6f}")  # fmt: skip
            if (batch_id + 1) % 2 == 0:  # the script's --checkpoint-interval: to the CPU, save, back
                transformer.eval().cpu()
                torch.save(transformer.state_dict(), os.path.join(checkpoint_dir, f"ckpt_epoch_{e}.pth"))
                transformer.to(device).train()
    transformer.eval().cpu()
    state = torch.load(os.path.join(checkpoint_dir, "ckpt_epoch_1.pth"))
    print("done on", device.type, "kept", all(torch.equal(state[k], v) for k, v in transformer.state_dict().items()))


if __name__ == "__main__":
    train()
