#!/usr/bin/env python3
"""Float64 fixtures for peft/meta (tests/train/test_meta_*.cpp), computed by torch autograd.

1. Second-order MAML on a tiny MLP  y = fc2(tanh(fc1(x)))  (2 -> 5 -> 1, MSE), meta-learning the
   subset {fc1.weight, fc2.weight, fc2.bias} (fc1.bias stays fixed): k = 2 plain-SGD inner steps of
   lr alpha on the support set, meta-gradient d L_q(theta_k) / d theta with create_graph=True
   (the exact second-order MAML gradient); plus the first-order MAML gradient and the Reptile
   direction theta - theta_k for the same task.
2. Prototypical-network loss on given embeddings (3-way 2-shot, 5 queries): loss and gradients of
   the support and query embeddings through the class means.

Writes tests/data/meta/meta_fixture.txt: one tensor per line, "name rows cols v0 v1 ..." (row-major,
%.17g). Run: ~/.cache/peft-peer/bin/python benchmarks/peer/make_meta_fixtures.py
"""
import os

import torch

torch.manual_seed(14)
dt = torch.float64
out = {}

# ---- 1. MAML on a tiny MLP ----
w1 = torch.randn(5, 2, dtype=dt) * 0.8
b1 = torch.randn(5, dtype=dt) * 0.3
w2 = torch.randn(1, 5, dtype=dt) * 0.8
b2 = torch.randn(1, dtype=dt) * 0.3
xs = torch.randn(6, 2, dtype=dt)
ys = torch.sin(xs[:, :1] * 1.5) + 0.3 * xs[:, 1:]
xq = torch.randn(7, 2, dtype=dt)
yq = torch.sin(xq[:, :1] * 1.5) + 0.3 * xq[:, 1:]
alpha, steps = 0.3, 2


def net(params, x):
    w1_, w2_, b2_ = params
    return torch.tanh(x @ w1_.T + b1) @ w2_.T + b2_


def mse(pred, y):
    return ((pred - y) ** 2).mean()


theta = [w1.clone().requires_grad_(True), w2.clone().requires_grad_(True), b2.clone().requires_grad_(True)]
fast = list(theta)
for _ in range(steps):
    g = torch.autograd.grad(mse(net(fast, xs), ys), fast, create_graph=True)
    fast = [p - alpha * gi for p, gi in zip(fast, g)]
lq = mse(net(fast, xq), yq)
meta = torch.autograd.grad(lq, theta)

# first-order: the same inner loop without the graph, gradient at theta_k
fo = [p.detach().clone() for p in theta]
for _ in range(steps):
    ps = [p.requires_grad_(True) for p in fo]
    g = torch.autograd.grad(mse(net(ps, xs), ys), ps)
    fo = [(p - alpha * gi).detach() for p, gi in zip(ps, g)]
ps = [p.requires_grad_(True) for p in fo]
fomaml = torch.autograd.grad(mse(net(ps, xq), yq), ps)
reptile = [(t.detach() - p.detach()) for t, p in zip(theta, fo)]

out.update(w1=w1, b1=b1.reshape(1, -1), w2=w2, b2=b2.reshape(1, -1), xs=xs, ys=ys, xq=xq, yq=yq,
           alpha=torch.tensor([[alpha]], dtype=dt), steps=torch.tensor([[float(steps)]], dtype=dt),
           query_loss=lq.detach().reshape(1, 1),
           maml_w1=meta[0], maml_w2=meta[1], maml_b2=meta[2].reshape(1, -1),
           fomaml_w1=fomaml[0], fomaml_w2=fomaml[1], fomaml_b2=fomaml[2].reshape(1, -1),
           reptile_w1=reptile[0], reptile_w2=reptile[1], reptile_b2=reptile[2].reshape(1, -1))

# ---- 2. Prototypical loss ----
n_way, k_shot, dim = 3, 2, 4
s = torch.randn(n_way * k_shot, dim, dtype=dt, requires_grad=True)
q = torch.randn(5, dim, dtype=dt, requires_grad=True)
s_labels = torch.tensor([0, 0, 1, 1, 2, 2])
q_labels = torch.tensor([2, 0, 1, 1, 0])
protos = torch.stack([s[s_labels == k].mean(0) for k in range(n_way)])
d = ((q[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
loss = torch.nn.functional.cross_entropy(-d, q_labels)
ds, dq = torch.autograd.grad(loss, [s, q])
out.update(proto_support=s.detach(), proto_query=q.detach(),
           proto_support_labels=s_labels.to(dt).reshape(1, -1), proto_query_labels=q_labels.to(dt).reshape(1, -1),
           proto_loss=loss.detach().reshape(1, 1), proto_dsupport=ds, proto_dquery=dq)

path = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "meta", "meta_fixture.txt")
with open(path, "w") as f:
    f.write(f"# made by benchmarks/peer/make_meta_fixtures.py with torch {torch.__version__}\n")
    for name, t in out.items():
        t = t.detach().reshape(t.shape[0], -1) if t.dim() == 2 else t.detach().reshape(1, -1)
        vals = " ".join("%.17g" % v for v in t.flatten().tolist())
        f.write(f"{name} {t.shape[0]} {t.shape[1]} {vals}\n")
print("wrote", os.path.normpath(path))
