#!/usr/bin/python3
"""Regenerates the reference numbers hard-coded in tests/optim/*.cpp and tests/loss/*.cpp.

Run with PyTorch 1.13 (Debian's python3-torch):  /usr/bin/python3 benchmarks/peer/optim_reference.py
Everything is computed in float64 by torch itself (torch.optim, torch.nn.functional,
torch.nn.utils.clip_grad_norm_); the schedule values use the Hugging Face transformers lambdas
(optimization.py), re-typed below because transformers is not a Debian package.

Optimizer problem (shared with the C++ tests): parameters W [2, 2] and b [2] (stored [1, 2] in C++),
loss L = sum(theta^4 / 4 - c * theta), so grad = theta^3 - c: elementwise but nonlinear, so that
every step's gradient depends on the previous update.
"""
import math

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)

W0 = [[0.5, -1.0], [1.5, 0.25]]
B0 = [-0.75, 2.0]
CW = [[0.1, -0.2], [0.3, 0.4]]
CB = [0.5, -0.6]


def fmt(t):
    vals = t.detach().reshape(-1).tolist()
    return "{" + ", ".join(repr(float(v)) for v in vals) + "}"


def grads(w, b):
    w.grad = None if not w.requires_grad else (w.detach() ** 3 - torch.tensor(CW))
    b.grad = None if not b.requires_grad else (b.detach() ** 3 - torch.tensor(CB))


def run(name, make_opt, steps=3, frozen_b_until=0):
    """frozen_b_until: b has requires_grad=False (no grad, skipped) for steps < frozen_b_until."""
    w = torch.tensor(W0, requires_grad=True)
    b = torch.tensor(B0, requires_grad=frozen_b_until == 0)
    opt = make_opt(w, b)
    print(f"// {name}")
    for s in range(steps):
        if s == frozen_b_until and frozen_b_until > 0:
            b.requires_grad_(True)
        grads(w, b)
        opt.step()
        print(f"//   step {s + 1}: W = {fmt(w)}, b = {fmt(b)}")


def optimizers():
    run("SGD lr=0.1 wd=0.01 (no momentum)", lambda w, b: torch.optim.SGD([w, b], lr=0.1, weight_decay=0.01))
    run("SGD lr=0.1 momentum=0.9 dampening=0.1 wd=0.01",
        lambda w, b: torch.optim.SGD([w, b], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01))
    run("SGD lr=0.1 momentum=0.9 nesterov wd=0.01",
        lambda w, b: torch.optim.SGD([w, b], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))
    run("Adam lr=0.1 betas=(0.9,0.999) eps=1e-8 wd=0.05",
        lambda w, b: torch.optim.Adam([w, b], lr=0.1, weight_decay=0.05))
    run("AdamW groups: W lr=0.1 wd=0.1, b lr=0.05 wd=0; betas=(0.8,0.99) eps=1e-6",
        lambda w, b: torch.optim.AdamW([{"params": [w], "lr": 0.1, "weight_decay": 0.1},
                                        {"params": [b], "lr": 0.05, "weight_decay": 0.0}],
                                       betas=(0.8, 0.99), eps=1e-6))
    run("AdamW lr=0.1 wd=0.1, b frozen for steps 1-2, unfrozen from step 3",
        lambda w, b: torch.optim.AdamW([w, b], lr=0.1, weight_decay=0.1), steps=5, frozen_b_until=2)
    run("SGD lr=0.1 momentum=0.9, b frozen for steps 1-2, unfrozen from step 3",
        lambda w, b: torch.optim.SGD([w, b], lr=0.1, momentum=0.9), steps=4, frozen_b_until=2)


def clipping():
    g1 = torch.tensor([[3.0, -4.0], [1.0, 2.0]])
    g2 = torch.tensor([[-2.0, 0.5, 1.5]])
    for norm_type, max_norm in ((2.0, 1.0), (float("inf"), 2.5), (1.0, 4.0), (3.0, 100.0)):
        p1 = torch.zeros(2, 2, requires_grad=True)
        p2 = torch.zeros(1, 3, requires_grad=True)
        p1.grad = g1.clone()
        p2.grad = g2.clone()
        total = torch.nn.utils.clip_grad_norm_([p1, p2], max_norm, norm_type=norm_type)
        print(f"// clip norm_type={norm_type} max_norm={max_norm}: total = {float(total)!r}, "
              f"g1 = {fmt(p1.grad)}, g2 = {fmt(p2.grad)}")


def losses():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0],
                           [0.3, -0.2, 2.5, 1.0, -3.0],
                           [40.0, 39.0, -40.0, 0.0, 1.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    labels = torch.tensor([1, -100, 0, 4])
    for eps in (0.0, 0.1):
        logits.grad = None
        loss = F.cross_entropy(logits, labels, label_smoothing=eps)
        loss.backward()
        print(f"// cross_entropy eps={eps}: loss = {loss.item()!r}, dlogits = {fmt(logits.grad)}")
    pred = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.5, 3.0]], requires_grad=True)
    target = torch.tensor([[1.0, -1.5], [0.0, 0.25], [1.0, 1.0]])
    loss = F.mse_loss(pred, target)
    loss.backward()
    print(f"// mse: loss = {loss.item()!r}, dpred = {fmt(pred.grad)}")
    chosen = torch.tensor([[1.0], [-0.5], [30.0], [-40.0]], requires_grad=True)
    rejected = torch.tensor([[0.0], [0.5], [-20.0], [45.0]], requires_grad=True)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    print(f"// bradley_terry: loss = {loss.item()!r}, dchosen = {fmt(chosen.grad)}, drejected = {fmt(rejected.grad)}")


# Hugging Face transformers optimization.py lambdas.
def hf_linear(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def hf_cosine(step, warmup, total, num_cycles=0.5, min_lr_rate=None):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if min_lr_rate is not None:  # get_cosine_with_min_lr_schedule_with_warmup
        factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)


def schedules():
    steps = [0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 130]
    print("// steps", steps)
    print("// linear W=10 N=100:", [hf_linear(s, 10, 100) for s in steps])
    print("// cosine W=10 N=100 cycles=0.5:", [hf_cosine(s, 10, 100) for s in steps])
    print("// cosine W=10 N=100 cycles=2:", [hf_cosine(s, 10, 100, 2.0) for s in steps])
    print("// cosine W=10 N=100 cycles=0.5 min_lr_rate=0.1:", [hf_cosine(s, 10, 100, 0.5, 0.1) for s in steps])
    # LambdaLR applies lambda(k) to the k-th optimizer.step(): three SGD steps on p with grad 1.
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: hf_cosine(s, 2, 6))
    for _ in range(4):
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    print(f"// LambdaLR(cosine W=2 N=6) on SGD lr=0.5, grad 1, 4 steps: p = {p.item()!r}")


if __name__ == "__main__":
    print(f"// torch {torch.__version__}")
    optimizers()
    clipping()
    losses()
    schedules()
