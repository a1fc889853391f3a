#!/usr/bin/python3
"""train-digits.py: trains the "digits" example model and exports it to ONNX.

DESIGN
The data is scikit-learn's copy of the UCI handwritten digits (Debian python3-sklearn,
sklearn.datasets.load_digits: 1797 images of 8x8 pixels, values 0..16, labels 0..9). A small
CNN (two 3x3 convolutions with max pooling, one linear layer, softmax) is trained with PyTorch
(Debian python3-torch) on a fixed 80% split and exported with torch.onnx (opset 11, dynamic
batch axis) for keel's onnx backend (OpenCV DNN 4.6). The model takes the 64 raw pixel values
of an image as the input "pixels" (FP32, [batch, 64], 0..16 as load_digits gives them) and
does the scaling and the reshape to 1x8x8 itself, so a row of numbers is a valid request (as
with `keel infer`). The output "probabilities" is [batch, 10].

Everything is seeded and single-threaded, so a rerun reproduces the same weights on the same
machine (PyTorch does not promise bit-identical results across versions or CPUs). It writes:
  examples/models/digits/1/model.onnx       the model
  examples/models/digits/config.json        keel's model configuration
  examples/digits_sample.txt                10 test images: label, then 64 pixels per line
  tests/data/onnx/digits/test_data_set_0/   input_0.pb (those 10 images) and output_0.pb
                                            (PyTorch's probabilities), ONNX TensorProto files
Run with Debian's interpreter: /usr/bin/python3 scripts/train-digits.py
"""

import json
import os
import random
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240531


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, pixels):
        x = (pixels / 16.0).reshape(-1, 1, 8, 8)
        x = self.pool(torch.relu(self.conv1(x)))  # 16 x 4 x 4
        x = self.pool(torch.relu(self.conv2(x)))  # 32 x 2 x 2
        x = x.reshape(-1, 32 * 2 * 2)
        return torch.softmax(self.fc(x), dim=1)


def main():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    digits = load_digits()
    x = digits.data.astype(np.float32)  # (1797, 64), 0..16
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(SEED).permutation(len(x))
    ntrain = int(0.8 * len(x))
    tr, te = order[:ntrain], order[ntrain:]

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(30):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            p = model(xt[idx])
            loss = nn.functional.nll_loss(torch.log(p + 1e-9), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x[te])).argmax(1).numpy()
    acc = float((pred == y[te]).mean())
    print("test accuracy on %d held-out images: %.4f" % (len(te), acc))
    if acc < 0.95:
        sys.exit("train-digits: accuracy %.3f is too low; not writing the model" % acc)

    model_dir = os.path.join(ROOT, "examples", "models", "digits")
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    path = os.path.join(model_dir, "1", "model.onnx")
    torch.onnx.export(model, torch.zeros(1, 64), path, input_names=["pixels"],
                      output_names=["probabilities"], opset_version=11,
                      dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
                      do_constant_folding=True)
    onnx.checker.check_model(onnx.load(path))

    config = {
        "name": "digits",
        "backend": "onnx",
        "max_batch_size": 64,
        "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}],
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    }
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    # One test image of each digit, in label order.
    sample = [int(next(i for i in te if y[i] == d)) for d in range(10)]
    with open(os.path.join(ROOT, "examples", "digits_sample.txt"), "w") as f:
        f.write("# label, then the 64 pixels (0..16) of an 8x8 image, row by row\n")
        for i in sample:
            f.write("%d %s\n" % (y[i], " ".join("%d" % v for v in x[i])))
    xs = x[sample]
    with torch.no_grad():
        ps = model(torch.from_numpy(xs)).numpy()
    ref = os.path.join(ROOT, "tests", "data", "onnx", "digits", "test_data_set_0")
    os.makedirs(ref, exist_ok=True)
    for name, arr, fn in (("pixels", xs, "input_0.pb"), ("probabilities", ps, "output_0.pb")):
        t = onnx.numpy_helper.from_array(arr.astype(np.float32), name)
        with open(os.path.join(ref, fn), "wb") as f:
            f.write(t.SerializeToString())
    print("wrote", path, "(%d bytes)" % os.path.getsize(path))
    print("sample predictions:", ps.argmax(1).tolist(), "labels:", y[sample].tolist())


if __name__ == "__main__":
    main()
