#!/usr/bin/env python3
"""Writes tests/data/torch_state/: a tiny torch nn.Module state dict saved by safetensors itself,
and the module's forward outputs, for io/load_state.hpp's test (tests/io/test_load_state.cpp).

The module is a wrapper holding the network under `model.` (as Hugging Face checkpoints name
their base model), so the C++ side loads it with a name map (strip_prefix("model.")):

    Wrapper.model = Net: fc1 = nn.Linear(4, 6), fc2 = nn.Linear(6, 3, bias=False)
    forward(x) = fc2(tanh(fc1(x)))

Files (all written by safetensors.torch.save_file):
    model.safetensors       the float32 state dict (metadata {"format": "pt"})
    model_fp16.safetensors  the same module after .half()
    reference.safetensors   x [5, 4] (float64), and the outputs:
                            y32 = the float32 module on x.float()   (float32)
                            y64 = the module in float64 on x          (float64)
                            y16 = the fp16 weights in float64 on x    (float64)

Usage (the peer venv, versions pinned in benchmarks/peer/requirements.txt, CPU):
    ~/.cache/peft-peer/bin/python benchmarks/peer/make_load_state_fixture.py tests/data/torch_state
"""
import os
import sys

import safetensors
import torch
from safetensors.torch import save_file


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.fc2 = torch.nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Net()

    def forward(self, x):
        return self.model(x)


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    m = Wrapper().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    save_file(m.state_dict(), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        y32 = m(x.float())
        y64 = Wrapper().double().eval()
        y64.load_state_dict(m.state_dict())
        y64 = y64(x)
        half = Wrapper().half()
        half.load_state_dict(m.state_dict())
        save_file(half.state_dict(), os.path.join(out, "model_fp16.safetensors"), metadata={"format": "pt"})
        h64 = Wrapper().double().eval()
        h64.load_state_dict(half.state_dict())
        y16 = h64(x)
    save_file({"x": x, "y32": y32.contiguous(), "y64": y64.contiguous(), "y16": y16.contiguous()},
              os.path.join(out, "reference.safetensors"))
    print("torch", torch.__version__, "safetensors", safetensors.__version__)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/torch_state")
