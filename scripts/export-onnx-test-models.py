#!/usr/bin/python3
"""export-onnx-test-models.py: the PyTorch-exported models keel's onnx tests compare against.

DESIGN
Three networks of the kinds people export from PyTorch, with seeded random weights (what is
tested is that keel computes what PyTorch computes, not what the weights mean):
  mlp         x [batch, 20] -> Linear 64, tanh, Linear 32, ReLU, Linear 5 -> y [batch, 5]
  mlp_b       the same with other weights (hot-swap tests tell A's answers from B's)
  cnn         image [batch, 3, 32, 32] -> 2 x (conv 3x3, batch norm, ReLU, max pool),
              linear 10, softmax -> probabilities [batch, 10]
  squeezenet  SqueezeNet 1.1's layout (conv, 8 Fire modules, ceil-mode max pools, dropout,
              1x1 conv classifier, global average pool) with 10 classes instead of 1000 and
              input [batch, 3, 64, 64]: the same operators and depth as the 5 MB ImageNet
              model in 2.9 MB, so the committed file stays small
Each is exported with torch.onnx (opset 11, dynamic batch axis) to
tests/data/onnx/<name>/model.onnx, and PyTorch's outputs for a seeded batch of 4 inputs are
written beside it as test_data_set_0/input_0.pb and output_0.pb (ONNX TensorProto files, the
layout of the ONNX test data), so the tests need neither torch nor onnx installed.
Run with Debian's interpreter: /usr/bin/python3 scripts/export-onnx-test-models.py
"""

import os

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "onnx")
SEED = 7


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 16), block(16, 32))
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, image):
        x = self.features(image)
        return torch.softmax(self.fc(torch.flatten(x, 1)), dim=1)


class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, e1, 1)
        self.e3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (Iandola et al. 2016, the torchvision layout), 10 classes."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, image):
        return torch.flatten(self.classifier(self.features(image)), 1)


def export(name, model, in_name, in_shape, out_name):
    model.eval()
    d = os.path.join(OUT, name)
    os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
    path = os.path.join(d, "model.onnx")
    torch.onnx.export(model, torch.zeros(1, *in_shape), path, input_names=[in_name],
                      output_names=[out_name], opset_version=11,
                      dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                      do_constant_folding=True)
    onnx.checker.check_model(onnx.load(path))
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(SEED + len(name)))
    with torch.no_grad():
        y = model(x)
    for fn, arr, tname in (("input_0.pb", x, in_name), ("output_0.pb", y, out_name)):
        t = onnx.numpy_helper.from_array(arr.numpy().astype(np.float32), tname)
        with open(os.path.join(d, "test_data_set_0", fn), "wb") as f:
            f.write(t.SerializeToString())
    print("%-10s %8d bytes, output %s" % (name, os.path.getsize(path), tuple(y.shape)))


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    export("mlp", MLP(), "x", (20,), "y")
    torch.manual_seed(SEED + 100)  # the same interface, other weights: the hot-swap tests' B
    export("mlp_b", MLP(), "x", (20,), "y")
    torch.manual_seed(SEED + 1)
    cnn = CNN()
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    export("cnn", cnn, "image", (3, 32, 32), "probabilities")
    torch.manual_seed(SEED + 2)
    export("squeezenet", SqueezeNet(), "image", (3, 64, 64), "scores")


if __name__ == "__main__":
    main()
