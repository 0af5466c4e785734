#!/usr/bin/env python3
"""Hugging Face PEFT loads adapter directories saved by peft-cpp, per-adapter heads included, and
computes the same outputs.

    build/release/examples/own_model_adapters --save-for-peft /tmp/interop
    ~/.cache/peft-peer/bin/python benchmarks/peer/check_peft_interop.py /tmp/interop

The C++ example trains a small MLP (fc1 -> GELU -> fc2 -> GELU -> head), then two LoRA adapters
"a" and "b" on fc1 and fc2, each with its own copy of the head (modules_to_save), and writes:
  base.safetensors   the pretrained weights under torch's names (fc1.weight, ..., head.bias)
  adapters/a, adapters/b   PeftModel::save_pretrained (PEFT's layout: a non-default adapter in <dir>/<name>)
  probe.safetensors  an input x and the C++ outputs with adapter a, with b, and with adapters disabled
  adapter_bias_all, probe_bias_all.safetensors   a LoRA adapter with bias = "all" (trained biases
                     saved with it, fc1's as "fc1.base_layer.bias") and its outputs
This script builds the same module in torch, loads the base, loads both directories with PEFT
(PeftModel.from_pretrained + load_adapter), and compares PEFT's outputs with the C++ ones.
Exits 1 on a mismatch. Versions: benchmarks/peer/requirements.txt (run with the pinned venv).
"""
import json
import os
import sys

import peft
import safetensors
import torch
from peft import PeftModel
from safetensors.torch import load_file


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))  # exact (erf) GELU, as peft::Activation::GELU
        h = torch.nn.functional.gelu(self.fc2(h))
        return self.head(h)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = sys.argv[1]
    torch.manual_seed(0)
    model = Mlp()
    model.load_state_dict(load_file(os.path.join(root, "base.safetensors")), strict=True)
    probe = load_file(os.path.join(root, "probe.safetensors"))
    x = probe["x"]

    for name in ("a", "b"):
        with open(os.path.join(root, "adapters", name, "adapter_config.json")) as f:
            cfg = json.load(f)
        print(f"adapter {name}: peft_type={cfg['peft_type']} r={cfg['r']} lora_alpha={cfg['lora_alpha']} "
              f"target_modules={cfg['target_modules']} modules_to_save={cfg['modules_to_save']}")

    pm = PeftModel.from_pretrained(model, os.path.join(root, "adapters", "a"), adapter_name="a")
    pm.load_adapter(os.path.join(root, "adapters", "b"), adapter_name="b")
    pm.eval()

    worst = 0.0
    ok = True
    with torch.no_grad():
        for label, adapter in (("out_a", "a"), ("out_b", "b")):
            pm.set_adapter(adapter)
            y = pm(x)
            rel = ((y - probe[label]).norm() / probe[label].norm()).item()
            worst = max(worst, rel)
            print(f"adapter {adapter}: relative difference to peft-cpp {rel:.2e}")
            ok &= rel < 1e-5
        with pm.disable_adapter():
            y = pm(x)
        rel = ((y - probe["out_base"]).norm() / probe["out_base"].norm()).item()
        print(f"adapters disabled: relative difference to peft-cpp {rel:.2e}")
        ok &= rel < 1e-5
        # The heads really differ per adapter (else the check above would not test modules_to_save).
        heads = pm.base_model.model.head.modules_to_save
        diff = (heads["a"].weight - heads["b"].weight).abs().max().item()
        print(f"head copies a vs b: max |difference| {diff:.3e} (must be > 0)")
        ok &= diff > 0
    # An adapter saved with bias = "all": PEFT loads the trained biases into the base model too.
    model = Mlp()
    model.load_state_dict(load_file(os.path.join(root, "base.safetensors")), strict=True)
    pb = PeftModel.from_pretrained(model, os.path.join(root, "adapter_bias_all"))
    pb.eval()
    with torch.no_grad():
        want = load_file(os.path.join(root, "probe_bias_all.safetensors"))["out"]
        rel = ((pb(x) - want).norm() / want.norm()).item()
    print(f"adapter with bias=\"all\": relative difference to peft-cpp {rel:.2e}")
    ok &= rel < 1e-5
    print(f"torch {torch.__version__}, peft {peft.__version__}, safetensors {safetensors.__version__}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
