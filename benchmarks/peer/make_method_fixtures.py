#!/usr/bin/env python3
"""Reference fixtures for VeRA, LoHa, LoKr and (IA)^3, made by the real Hugging Face `peft` package.

Writes tests/data/methods/ (see the README.md there for the formulas, key names and shapes):

  base.safetensors, base_f64.safetensors   the tiny base model (float32 / float64), keys as the model has them
  <case>/adapter_config.json               model.save_pretrained(<case>) exactly as PEFT writes it
  <case>/adapter_model.safetensors
  <case>/expected.safetensors              x, y (adapter on), y_base (adapter off), per-module in./out.;
                                           LoHa/LoKr/VeRA: delta.<module> (PEFT's get_delta_weight; the
                                           merge_and_unload() state dict is base + delta bitwise, checked here);
                                           IA3: merged.<param> (merge_and_unload() entries that differ from base)
  lokr_factorization.json                  PEFT's lokr `factorization(dimension, factor)` on a grid
  vera_noproj/                             a VeRA adapter saved with save_projection=False (no vera_A/vera_B:
                                           a C++ loader must refuse it); no expected.safetensors

Every fixture is then re-read from disk and checked against a plain re-implementation of the formulas written
in the README (float64 torch, no PEFT code), so the README's formulas are verified by this script.

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_method_fixtures.py tests/data/methods
       (add --check-only to re-verify existing fixtures without regenerating them)
"""
import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import warnings

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import peft
from peft import IA3Config, LoHaConfig, LoKrConfig, PeftModel, VeraConfig, get_peft_model

HIDDEN = 12
MODULES = {  # module path in the base model -> (in_features, out_features)
    "model.layers.0.self_attn.q_proj": (12, 8),
    "model.layers.0.self_attn.v_proj": (8, 12),
    "model.layers.0.mlp.fc1": (12, 16),
    "model.layers.0.mlp.fc2": (16, 12),
}
PREFIX = "base_model.model."
N_ROWS = 4


# ----------------------------------------------------------------------------------------------------------------
# The tiny base model. Forward (documented in the README so that C++ can run it):
#   a = tanh(q_proj(x)); h = x + v_proj(a); m = tanh(fc1(h)); y = h + fc2(m)
# ----------------------------------------------------------------------------------------------------------------
class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 8)
        self.v_proj = nn.Linear(8, 12)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 12)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn()
        self.mlp = Mlp()

    def forward(self, x):
        h = x + self.self_attn.v_proj(torch.tanh(self.self_attn.q_proj(x)))
        return h + self.mlp.fc2(torch.tanh(self.mlp.fc1(h)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TinyModel(nn.Module):
    """Wrapper so that module paths read `model.layers.0...` as in a transformers causal LM."""

    def __init__(self):
        super().__init__()
        self.model = Decoder()

    def forward(self, x):
        return self.model(x)


def build_base(dtype):
    torch.manual_seed(0)
    m = TinyModel()
    return m.to(dtype).eval()


def fixed_input(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_ROWS, HIDDEN, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------
ALL = ["q_proj", "v_proj", "fc1", "fc2"]

CASES = [
    # name, dtype, config factory, std of the random adapter values
    ("vera", torch.float32,
     lambda: VeraConfig(r=4, target_modules=ALL, projection_prng_key=42, save_projection=True, d_initial=0.5,
                        vera_dropout=0.1), 0.4),
    ("loha", torch.float32,
     lambda: LoHaConfig(r=4, alpha=8, target_modules=ALL, rank_dropout=0.1, module_dropout=0.1), 0.3),
    ("loha_f64", torch.float64,
     lambda: LoHaConfig(r=4, alpha=8, target_modules=ALL, rank_pattern={"fc1": 3}, alpha_pattern={"fc2": 3},
                        use_effective_conv2d=True), 0.3),
    ("lokr", torch.float32,
     lambda: LoKrConfig(r=4, alpha=8, target_modules=ALL), 0.2),
    ("lokr_decompose_both", torch.float32,
     lambda: LoKrConfig(r=4, alpha=8, target_modules=ALL, decompose_both=True, rank_pattern={"q_proj": 1}), 0.2),
    ("lokr_factor", torch.float32,
     lambda: LoKrConfig(r=4, alpha=8, target_modules=ALL, decompose_factor=3, rank_pattern={"fc1": 2}), 0.2),
    ("ia3", torch.float32,
     lambda: IA3Config(target_modules=ALL, feedforward_modules=["fc2"]), 0.2),
]

ADAPTER_PARAM = re.compile(r"\.(vera_lambda_[bd]|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|ia3_l)\.default$")


def randomise(peft_model, method, std, seed):
    """Overwrite every adapter parameter with seeded random values (PEFT zero-initialises some factors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if not ADAPTER_PARAM.search(name):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            val = 1.0 + std * noise if method == "IA3" else std * noise
            p.copy_(val.to(p.dtype))


def one_key_metadata(what, versions):
    """safetensors keeps __metadata__ in a hash map (random key order on write): one key keeps files byte-stable."""
    return {"source": "benchmarks/peer/make_method_fixtures.py " + what + " "
            + " ".join(f"{k}={v}" for k, v in versions.items())}


def tuner_layer(peft_model, module):
    return peft_model.get_submodule(PREFIX + module)


def make_case(out_dir, name, dtype, make_cfg, std, versions):
    case_dir = os.path.join(out_dir, name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    base = build_base(dtype)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = make_cfg()
    method = cfg.peft_type.value if hasattr(cfg.peft_type, "value") else str(cfg.peft_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, cfg)
    randomise(pm, method, std, seed=1000 + sum(map(ord, name)))
    pm.eval()

    x = fixed_input(dtype)
    io = {}
    hooks = []
    for mod in MODULES:
        layer = tuner_layer(pm, mod)

        def hook(m, inp, out, mod=mod):
            io["in." + mod] = inp[0].detach().clone()
            io["out." + mod] = out.detach().clone()

        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        y = pm(x).detach().clone()
    for h in hooks:
        h.remove()
    with torch.no_grad(), pm.disable_adapter():
        y_base = pm(x).detach().clone()

    deltas = {}
    for mod in MODULES:
        layer = tuner_layer(pm, mod)
        if hasattr(layer, "get_delta_weight"):
            with torch.no_grad():
                deltas["delta." + mod] = layer.get_delta_weight("default").detach().clone()

    merged_model = copy.deepcopy(pm).merge_and_unload()
    with torch.no_grad():
        y_merged = merged_model(x)
    merged_sd = merged_model.state_dict()
    merged = {}
    if deltas:
        # LoHa / LoKr / VeRA: merge_and_unload() does `weight += delta` in the model dtype, biases untouched, so the
        # merged state dict is base + delta bitwise; only the deltas are stored.
        for k, v in merged_sd.items():
            mod = k[: -len(".weight")]
            want = base_sd[k] + deltas["delta." + mod] if ("delta." + mod) in deltas and k.endswith(".weight") \
                else base_sd[k]
            assert torch.equal(v, want), f"{name}: merged {k} is not base + delta bitwise"
    else:
        # (IA)^3 has no delta weight: store the merged entries that differ from base (weights, non-ff biases).
        for k, v in merged_sd.items():
            if not torch.equal(v, base_sd[k]):
                merged["merged." + k] = v.detach().clone()

    tol = 2e-6 if dtype == torch.float32 else 1e-12
    err = (y_merged - y).abs().max().item()
    assert err < tol * 10, f"{name}: merged model output differs from adapter output by {err}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(case_dir)
    model_card = os.path.join(case_dir, "README.md")
    if os.path.exists(model_card):
        os.remove(model_card)

    expected = {"x": x, "y": y, "y_base": y_base, **io, **deltas, **merged}
    expected = {k: v.contiguous() for k, v in expected.items()}
    save_file(expected, os.path.join(case_dir, "expected.safetensors"),
              metadata=one_key_metadata(f"case={name} method={method} adapter_std={std}", versions))

    # Round trip through PEFT's own loader onto a fresh base model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(build_base(dtype), case_dir).eval()
    with torch.no_grad():
        y_re = reloaded(x)
    assert torch.equal(y_re, y), f"{name}: reload changed the output ({(y_re - y).abs().max().item()})"
    print(f"  {name}: written; PEFT reload reproduces y bitwise; merged-model output err {err:.2e}")


def make_vera_noproj(out_dir, versions):
    """save_projection=False: what is in the file, and what PEFT does on load."""
    name = "vera_noproj"
    case_dir = os.path.join(out_dir, name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    dtype = torch.float32
    cfg = VeraConfig(r=4, target_modules=ALL, projection_prng_key=42, save_projection=False, d_initial=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build_base(dtype), cfg)
    randomise(pm, "VERA", 0.4, seed=7)
    pm.eval()
    x = fixed_input(dtype)
    with torch.no_grad():
        y = pm(x)
    A0 = pm.base_model.vera_A["default"].clone()
    B0 = pm.base_model.vera_B["default"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(case_dir)
    model_card = os.path.join(case_dir, "README.md")
    if os.path.exists(model_card):
        os.remove(model_card)
    keys = sorted(load_file(os.path.join(case_dir, "adapter_model.safetensors")).keys())
    assert not any("vera_A" in k or "vera_B" in k for k in keys), keys
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        re_pm = PeftModel.from_pretrained(build_base(dtype), case_dir).eval()
    msgs = sorted({str(m.message) for m in w if "vera" in str(m.message).lower() or "PRNG" in str(m.message)})
    A1 = re_pm.base_model.vera_A["default"]
    B1 = re_pm.base_model.vera_B["default"]
    with torch.no_grad():
        y1 = re_pm(x)
    # The regeneration, written out: torch.Generator('cpu').manual_seed(key); kaiming-uniform A then B.
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    in_max = max(i for i, _ in MODULES.values())
    out_max = max(o for _, o in MODULES.values())
    A2 = torch.empty(cfg.r, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
    B2 = torch.empty(out_max, cfg.r).uniform_(-math.sqrt(6 / cfg.r), math.sqrt(6 / cfg.r), generator=g)
    assert torch.equal(A0, A1) and torch.equal(B0, B1), "PEFT did not regenerate the same projections"
    assert torch.equal(A2, A1) and torch.equal(B2, B1), "regeneration recipe in the README is wrong"
    assert torch.equal(y, y1)
    print(f"  {name}: keys {keys}")
    print(f"  {name}: reload regenerated vera_A {tuple(A1.shape)} / vera_B {tuple(B1.shape)} bitwise from "
          f"projection_prng_key={cfg.projection_prng_key}; y reproduced bitwise")
    for m in msgs:
        print(f"  {name}: load warning: {m}")
    return msgs


def write_factorization_table(out_dir):
    from peft.tuners.lokr.layer import factorization

    rows = []
    for d in range(1, 33):
        for f in (-1, 1, 2, 3, 4, 5):
            m, n = factorization(d, f)
            rows.append([d, f, m, n])
    with open(os.path.join(out_dir, "lokr_factorization.json"), "w") as fh:
        fh.write('{"comment": "peft.tuners.lokr.layer.factorization(dimension, factor) -> (m, n); rows are '
                 '[dimension, factor, m, n]",\n "rows": [\n')
        fh.write(",\n".join("  " + json.dumps(r) for r in rows))
        fh.write("\n ]}\n")


# ----------------------------------------------------------------------------------------------------------------
# Independent re-implementation of the README formulas (float64, no PEFT code) and the self-checks.
# ----------------------------------------------------------------------------------------------------------------
def ref_factorization(dimension, factor=-1):
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # note: never updated inside the loop
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def pattern_value(pattern, module, default):
    """rank_pattern / alpha_pattern: first key (in JSON order) with re.match(rf'(.*\\.)?({key})$', module)."""
    for key, val in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def ref_delta(method, cfg, ad, mod, in_f, out_f, exact_loha_scale=False):
    """Delta weight [out, in] for one module from the adapter tensors (float64)."""
    p = PREFIX + mod + "."
    if method == "VERA":
        A = ad["base_model.vera_A"][:, :in_f]
        B = ad["base_model.vera_B"][:out_f, :]
        lb = ad[p + "vera_lambda_b"]
        ld = ad[p + "vera_lambda_d"]
        return (lb[:, None] * B) @ (ld[:, None] * A)
    r = pattern_value(cfg["rank_pattern"], mod, cfg["r"])
    alpha = pattern_value(cfg["alpha_pattern"], mod, cfg["alpha"])
    scale = alpha / r
    if method == "LOHA":
        # PEFT passes scale=torch.tensor(alpha / r): a float32 scalar (torch's default dtype), also for float64 models
        if not exact_loha_scale:
            scale = float(torch.tensor(scale, dtype=torch.float32))
        return (ad[p + "hada_w1_a"] @ ad[p + "hada_w1_b"]) * (ad[p + "hada_w2_a"] @ ad[p + "hada_w2_b"]) * scale
    if method == "LOKR":
        w1 = ad[p + "lokr_w1"] if p + "lokr_w1" in ad else ad[p + "lokr_w1_a"] @ ad[p + "lokr_w1_b"]
        w2 = ad[p + "lokr_w2"] if p + "lokr_w2" in ad else ad[p + "lokr_w2_a"] @ ad[p + "lokr_w2_b"]
        return torch.kron(w1, w2) * scale
    raise ValueError(method)


def ref_lokr_shapes(cfg, mod, in_f, out_f):
    """Which LoKr keys PEFT creates for an nn.Linear (in_f -> out_f), with their shapes."""
    r = pattern_value(cfg["rank_pattern"], mod, cfg["r"])
    f = cfg["decompose_factor"]
    in_m, in_n = ref_factorization(in_f, f)
    out_l, out_k = ref_factorization(out_f, f)
    shapes = {}
    if not (cfg["decompose_both"] and r < max(out_l, in_m) / 2):
        shapes["lokr_w1"] = [out_l, in_m]
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = [out_l, r], [r, in_m]
    if not (r < max(out_k, in_n) / 2):
        shapes["lokr_w2"] = [out_k, in_n]
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = [out_k, r], [r, in_n]
    return shapes


def ref_module_forward(method, cfg, ad, mod, W, b, x):
    """One adapted nn.Linear, adapter active, eval mode. x: [rows, in]."""
    in_f, out_f = MODULES[mod]
    p = PREFIX + mod + "."
    if method == "IA3":
        l = ad[p + "ia3_l"].flatten()
        if is_feedforward(cfg, mod):
            return (x * l) @ W.T + b
        return (x @ W.T + b) * l
    if method == "VERA":
        A = ad["base_model.vera_A"][:, :in_f]
        B = ad["base_model.vera_B"][:out_f, :]
        lb = ad[p + "vera_lambda_b"]
        ld = ad[p + "vera_lambda_d"]
        return x @ W.T + b + lb * ((ld * (x @ A.T)) @ B.T)
    # LoHa / LoKr: the delta weight is built, then F.linear(x, delta) is added (no bias)
    return x @ W.T + b + x @ ref_delta(method, cfg, ad, mod, in_f, out_f).T


def is_feedforward(cfg, mod):
    ff = cfg["feedforward_modules"]
    if isinstance(ff, str):
        return re.fullmatch(ff, mod) is not None
    return any(mod.endswith(k) for k in ff)  # plain suffix test, no '.' boundary


def ref_merged(method, cfg, ad, mod, W, b):
    in_f, out_f = MODULES[mod]
    if method == "IA3":
        l = ad[PREFIX + mod + ".ia3_l"].flatten()
        if is_feedforward(cfg, mod):
            return W * l[None, :], b  # columns (input features) scaled, bias untouched
        return W * l[:, None], b * l  # rows (output features) scaled, bias scaled too
    return W + ref_delta(method, cfg, ad, mod, in_f, out_f), b


def ref_model_forward(weights, x, module_fn):
    def lin(mod, inp):
        return module_fn(mod, weights[mod + ".weight"], weights[mod + ".bias"], inp)

    a = torch.tanh(lin("model.layers.0.self_attn.q_proj", x))
    h = x + lin("model.layers.0.self_attn.v_proj", a)
    m = torch.tanh(lin("model.layers.0.mlp.fc1", h))
    return h + lin("model.layers.0.mlp.fc2", m)


def numeric_rank(M, rel=1e-9):
    s = torch.linalg.svdvals(M)
    return int((s > rel * s[0]).sum().item()) if s[0] > 0 else 0


def check_case(out_dir, name, report):
    case_dir = os.path.join(out_dir, name)
    with open(os.path.join(case_dir, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    method = cfg["peft_type"]
    ad_raw = load_file(os.path.join(case_dir, "adapter_model.safetensors"))
    ex_raw = load_file(os.path.join(case_dir, "expected.safetensors"))
    dtype = ex_raw["x"].dtype
    base_raw = load_file(os.path.join(out_dir, "base.safetensors" if dtype == torch.float32 else "base_f64.safetensors"))
    for k, v in ad_raw.items():
        assert v.dtype == dtype, f"{name}: {k} has dtype {v.dtype}, expected {dtype}"
    ad = {k: v.double() for k, v in ad_raw.items()}
    ex = {k: v.double() for k, v in ex_raw.items()}
    base = {k: v.double() for k, v in base_raw.items()}
    tol = 2e-6 if dtype == torch.float32 else 1e-12

    def close(a, b, what):
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: {what}: max err {err:.3e} > {tol}"
        return err

    worst = 0.0
    # key set: exactly what the README says
    expected_keys = set()
    if method == "VERA":
        expected_keys |= {"base_model.vera_A", "base_model.vera_B"}
    for mod, (in_f, out_f) in MODULES.items():
        p = PREFIX + mod + "."
        if method == "VERA":
            expected_keys |= {p + "vera_lambda_b", p + "vera_lambda_d"}
            assert list(ad[p + "vera_lambda_b"].shape) == [out_f] and list(ad[p + "vera_lambda_d"].shape) == [cfg["r"]]
        elif method == "LOHA":
            r = pattern_value(cfg["rank_pattern"], mod, cfg["r"])
            shp = {"hada_w1_a": [out_f, r], "hada_w1_b": [r, in_f], "hada_w2_a": [out_f, r], "hada_w2_b": [r, in_f]}
            for k, s in shp.items():
                assert list(ad[p + k].shape) == s, (name, mod, k, ad[p + k].shape, s)
            expected_keys |= {p + k for k in shp}
        elif method == "LOKR":
            shp = ref_lokr_shapes(cfg, mod, in_f, out_f)
            for k, s in shp.items():
                assert list(ad[p + k].shape) == s, (name, mod, k, ad[p + k].shape, s)
            expected_keys |= {p + k for k in shp}
            report.setdefault(name, {})[mod] = {k: s for k, s in shp.items()}
        elif method == "IA3":
            ff = is_feedforward(cfg, mod)
            assert list(ad[p + "ia3_l"].shape) == ([1, in_f] if ff else [out_f, 1])
            expected_keys.add(p + "ia3_l")
    assert set(ad) == expected_keys, f"{name}: keys {sorted(set(ad) ^ expected_keys)}"
    if method == "VERA":
        in_max = max(i for i, _ in MODULES.values())
        out_max = max(o for _, o in MODULES.values())
        assert list(ad["base_model.vera_A"].shape) == [cfg["r"], in_max]
        assert list(ad["base_model.vera_B"].shape) == [out_max, cfg["r"]]

    # per-module: delta, forward, merged, rank
    for mod, (in_f, out_f) in MODULES.items():
        W, b = base[mod + ".weight"], base[mod + ".bias"]
        if method != "IA3":
            d = ref_delta(method, cfg, ad, mod, in_f, out_f)
            worst = max(worst, close(d, ex["delta." + mod], f"delta {mod}"))
            rk = numeric_rank(d)
            if method == "VERA":
                assert rk == cfg["r"], (name, mod, rk)
            elif method == "LOHA":
                r = pattern_value(cfg["rank_pattern"], mod, cfg["r"])
                assert rk <= r * r, (name, mod, rk)
            elif method == "LOKR":
                p = PREFIX + mod + "."
                w1 = ad[p + "lokr_w1"] if p + "lokr_w1" in ad else ad[p + "lokr_w1_a"] @ ad[p + "lokr_w1_b"]
                w2 = ad[p + "lokr_w2"] if p + "lokr_w2" in ad else ad[p + "lokr_w2_a"] @ ad[p + "lokr_w2_b"]
                assert rk == numeric_rank(w1) * numeric_rank(w2), (name, mod, rk)
            report.setdefault("ranks", {})[f"{name}:{mod.split('.')[-1]}"] = rk
        out = ref_module_forward(method, cfg, ad, mod, W, b, ex["in." + mod])
        worst = max(worst, close(out, ex["out." + mod], f"module forward {mod}"))
        Wm, bm = ref_merged(method, cfg, ad, mod, W, b)
        if method == "IA3":
            Wm_ex = ex.get("merged." + mod + ".weight", W)
            bm_ex = ex.get("merged." + mod + ".bias", b)
        else:  # merged = base + delta (bitwise in the model dtype), bias unchanged
            Wm_ex = (base_raw[mod + ".weight"] + ex_raw["delta." + mod]).double()
            bm_ex = b
        worst = max(worst, close(Wm, Wm_ex, f"merged weight {mod}"), close(bm, bm_ex, f"merged bias {mod}"))

    if name == "loha_f64":
        # the float32 rounding of alpha / r is visible in float64: 8/3 (fc1) is not a float32 number
        mod = "model.layers.0.mlp.fc1"
        d_exact = ref_delta(method, cfg, ad, mod, *MODULES[mod], exact_loha_scale=True)
        err = (d_exact - ex["delta." + mod]).abs().max().item()
        assert err > 100 * tol, err
        print(f"  {name}: with the exact float64 scale 8/3 instead of float32(8/3), delta fc1 would differ by {err:.1e}")

    # whole model, adapter active / disabled / merged
    y = ref_model_forward(base, ex["x"], lambda mod, W, b, inp: ref_module_forward(method, cfg, ad, mod, W, b, inp))
    worst = max(worst, close(y, ex["y"], "model forward (adapter on)"))
    y0 = ref_model_forward(base, ex["x"], lambda mod, W, b, inp: inp @ W.T + b)
    worst = max(worst, close(y0, ex["y_base"], "model forward (adapter off)"))
    merged_w = dict(base)
    for k, v in ex.items():
        if k.startswith("merged."):
            merged_w[k[len("merged."):]] = v
        elif k.startswith("delta."):
            mod = k[len("delta."):]
            merged_w[mod + ".weight"] = (base_raw[mod + ".weight"] + ex_raw[k]).double()
    ym = ref_model_forward(merged_w, ex["x"], lambda mod, W, b, inp: inp @ W.T + b)
    worst = max(worst, close(ym, ex["y"], "merged model forward"))
    assert (ex["y"] - ex["y_base"]).abs().max().item() > 1e-3, f"{name}: adapter is (nearly) identity"
    print(f"  {name}: formulas verified (max abs err {worst:.2e}, tol {tol:g})")


def check_options():
    """Which LoHa/LoKr/VeRA options change the eval-mode math for nn.Linear."""
    x = fixed_input(torch.float32)
    results = {}

    def y_of(cfg, seed=5, train=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(build_base(torch.float32), cfg)
        method = cfg.peft_type.value
        randomise(pm, method, 0.3, seed)
        pm.train(train)
        torch.manual_seed(123)
        with torch.no_grad():
            return pm(x), sorted((k, tuple(v.shape)) for k, v in pm.state_dict().items() if ADAPTER_PARAM.search(k))

    y_ref, keys_ref = y_of(LoHaConfig(r=4, alpha=8, target_modules=ALL))
    for label, kw in [("loha rank_dropout=0.5,module_dropout=0.5 (eval)", dict(rank_dropout=0.5, module_dropout=0.5)),
                      ("loha use_effective_conv2d=True", dict(use_effective_conv2d=True)),
                      ("loha init_weights=False", dict(init_weights=False))]:
        y, keys = y_of(LoHaConfig(r=4, alpha=8, target_modules=ALL, **kw))
        results[label] = "no change" if torch.equal(y, y_ref) and keys == keys_ref else "CHANGES"
    y, _ = y_of(LoHaConfig(r=4, alpha=8, target_modules=ALL, rank_dropout=0.5), train=True)
    results["loha rank_dropout=0.5 (train mode)"] = "no change" if torch.equal(y, y_ref) else "CHANGES (random rows)"

    y_ref, keys_ref = y_of(LoKrConfig(r=4, alpha=8, target_modules=ALL))
    for label, kw in [("lokr rank_dropout=0.5,module_dropout=0.5,rank_dropout_scale=True (eval)",
                       dict(rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True)),
                      ("lokr use_effective_conv2d=True", dict(use_effective_conv2d=True)),
                      ("lokr init_weights='lycoris'", dict(init_weights="lycoris")),
                      ("lokr init_weights=False", dict(init_weights=False)),
                      ("lokr decompose_both=True (r=4, dims<=16)", dict(decompose_both=True)),
                      ("lokr decompose_factor=4", dict(decompose_factor=4))]:
        y, keys = y_of(LoKrConfig(r=4, alpha=8, target_modules=ALL, **kw))
        results[label] = ("no change" if keys == keys_ref and torch.equal(y, y_ref)
                          else "same keys, different y" if keys == keys_ref else "CHANGES key shapes")
    y_ref, _ = y_of(VeraConfig(r=4, target_modules=ALL, projection_prng_key=42))
    y, _ = y_of(VeraConfig(r=4, target_modules=ALL, projection_prng_key=43))
    results["vera projection_prng_key 42 -> 43 (same lambdas)"] = "no change" if torch.equal(y, y_ref) else "CHANGES"
    y, _ = y_of(VeraConfig(r=4, target_modules=ALL, projection_prng_key=42, d_initial=0.9, vera_dropout=0.5))
    results["vera d_initial=0.9, vera_dropout=0.5 (eval, lambdas overwritten)"] = (
        "no change" if torch.equal(y, y_ref) else "CHANGES")
    for k, v in results.items():
        print(f"  option check: {k}: {v}")
    changes = {"loha rank_dropout=0.5 (train mode)", "lokr decompose_factor=4",
               "vera projection_prng_key 42 -> 43 (same lambdas)"}
    for k, v in results.items():
        assert (v != "no change") == (k in changes), f"option check {k!r}: {v} (README says otherwise)"
    return results


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT turns target_modules / feedforward_modules into Python sets and writes them in set order, which
        # depends on the string-hash seed: pin it so adapter_config.json is byte-stable between runs.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    import safetensors
    import transformers

    versions = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                "safetensors": safetensors.__version__}
    print("versions:", versions)
    torch.set_num_threads(1)  # deterministic reductions

    if not args.check_only:
        save_file({k: v.contiguous() for k, v in build_base(torch.float32).state_dict().items()},
                  os.path.join(out_dir, "base.safetensors"), metadata=one_key_metadata("base float32", versions))
        save_file({k: v.contiguous() for k, v in build_base(torch.float64).state_dict().items()},
                  os.path.join(out_dir, "base_f64.safetensors"), metadata=one_key_metadata("base float64", versions))
        for name, dtype, make_cfg, std in CASES:
            make_case(out_dir, name, dtype, make_cfg, std, versions)
        make_vera_noproj(out_dir, versions)
        write_factorization_table(out_dir)
        for root, _, files in os.walk(out_dir):  # safetensors writes 0600 files
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)

    print("self-checks:")
    with open(os.path.join(out_dir, "lokr_factorization.json")) as fh:
        rows = json.load(fh)["rows"]
    for d, f, m, n in rows:
        assert ref_factorization(d, f) == (m, n), (d, f, m, n, ref_factorization(d, f))
    from peft.tuners.lokr.layer import factorization
    for d in range(1, 300):
        for f in range(-1, 20):
            if f != 0:
                assert factorization(d, f) == ref_factorization(d, f), (d, f)
    print(f"  lokr factorization: README algorithm == PEFT's on {len(rows)} table rows and d<300, f in -1..19")
    report = {}
    for name, *_ in CASES:
        check_case(out_dir, name, report)
    for name, mods in report.items():
        if name == "ranks":
            continue
        for mod, shp in mods.items():
            print(f"  {name} {mod.split('.')[-1]}: " + ", ".join(f"{k}{s}" for k, s in shp.items()))
    print("  delta ranks: " + ", ".join(f"{k}={v}" for k, v in report["ranks"].items()))
    noproj = load_file(os.path.join(out_dir, "vera_noproj", "adapter_model.safetensors"))
    assert not any(k.startswith("base_model.vera_") for k in noproj)
    with open(os.path.join(out_dir, "vera_noproj", "adapter_config.json")) as fh:
        assert json.load(fh)["save_projection"] is False
    print("  vera_noproj: no base_model.vera_A / vera_B keys, save_projection=false")
    check_options()
    print("all self-checks passed")


if __name__ == "__main__":
    sys.exit(main())
