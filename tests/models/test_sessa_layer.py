"""SessaLayer / SessaMixer against an independent float64 oracle written from docs/sessa_math.md,
reference state-dict compatibility, cached decoding and constructor validation."""

from __future__ import annotations

import math

import pytest
import torch

from sessa_scale.errors import UserError
from sessa_scale.models.sessa import SessaLayer, SessaMixer

D, B, T = 16, 2, 13


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# The oracle: the spec's formulas, one einsum at a time, on a plain dict of float64 tensors.


def reference_state_dict(H, H_kv, H_b, rope, max_len, seed=0):
    """Random weights under exactly the reference implementation's key names."""
    g = torch.Generator().manual_seed(seed)
    d, kv = D // H, H_kv * (D // H)

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def b(n):
        return 0.1 * torch.randn(n, generator=g)

    sd = {
        "ln.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "ln.bias": b(D),
        "W_in.weight": w(2 * D, D),
        "W_in.bias": b(2 * D),
        "mixer.q_proj.weight": w(D, D),
        "mixer.q_proj.bias": b(D),
        "mixer.k_proj.weight": w(kv, D),
        "mixer.k_proj.bias": b(kv),
        "mixer.v_proj.weight": w(kv, D),
        "mixer.v_proj.bias": b(kv),
        "mixer.proj_fb.weight": 3 * w(2 * D, D),  # sharper routing than uniform
        "mixer.proj_fb.bias": b(2 * D),
        "mixer.gamma_bias": torch.tensor(0.8) if H_b == 1 else 0.8 + b(H_b),
        "mixer.gamma_ctx.weight": w(H_b, D),
        "W_out.weight": w(D, D),
        "W_out.bias": b(D),
    }
    if H > 1:
        sd["mixer.out_proj.weight"] = w(D, D)
    if rope:
        sd["mixer.rope_inv_freq"] = 10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    if max_len is not None:
        ones = torch.ones(max_len, max_len, dtype=torch.bool)
        sd["mixer.causal_mask_f_full"] = torch.triu(ones, 1)
        sd["mixer.causal_mask_fb_full"] = torch.triu(ones, 0)
    return sd


def linear(sd, name, x):
    out = torch.einsum("...i,oi->...o", x, sd[name + ".weight"])
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def rope_complex(x, inv_freq):
    """Rotate pairs (2i, 2i+1) as complex numbers by exp(i * pos * inv_freq[i]). x: (B, T, H, d)."""
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    rot = torch.polar(torch.ones(x.shape[1], inv_freq.shape[0]), pos[:, None] * inv_freq)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(x.shape)


def oracle_forward_branch(sd, a_bar, H, H_kv, rope):
    """f = out_proj(causal multi-head attention with GQA and optional RoPE). a_bar (B, T, D)."""
    Bq, Tq, _ = a_bar.shape
    d = D // H
    q = linear(sd, "mixer.q_proj", a_bar).reshape(Bq, Tq, H, d)
    k = linear(sd, "mixer.k_proj", a_bar).reshape(Bq, Tq, H_kv, d)
    v = linear(sd, "mixer.v_proj", a_bar).reshape(Bq, Tq, H_kv, d)
    if rope:
        q, k = rope_complex(q, sd["mixer.rope_inv_freq"]), rope_complex(k, sd["mixer.rope_inv_freq"])
    kv_of = torch.arange(H) // (H // H_kv)  # query head h reads kv head h // (H / H_kv)
    k, v = k[:, :, kv_of], v[:, :, kv_of]
    logits = torch.einsum("bthd,bjhd->bhtj", q, k) / math.sqrt(d)
    causal = torch.ones(Tq, Tq, dtype=torch.bool).tril()
    weights = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
    heads = torch.einsum("bhtj,bjhd->bthd", weights, v).reshape(Bq, Tq, D)
    return linear(sd, "mixer.out_proj", heads) if H > 1 else heads


def oracle_feedback_inputs(sd, a_bar, gamma_max, H_b):
    """q_b, k_b (B, T, H_b, D/H_b) and gamma (B, T, H_b)."""
    Bq, Tq, _ = a_bar.shape
    fb = linear(sd, "mixer.proj_fb", a_bar)
    q_b = fb[..., :D].reshape(Bq, Tq, H_b, D // H_b)
    k_b = fb[..., D:].reshape(Bq, Tq, H_b, D // H_b)
    gamma = gamma_max * torch.tanh(sd["mixer.gamma_bias"] + linear(sd, "mixer.gamma_ctx", a_bar))
    return q_b, k_b, gamma


def oracle_mixer(sd, a_bar, H, H_kv, H_b, rope, gamma_max):
    """s solving (I - diag(gamma) alpha) s = f per feedback head, alpha dense and strictly causal."""
    Bq, Tq, _ = a_bar.shape
    f = oracle_forward_branch(sd, a_bar, H, H_kv, rope).reshape(Bq, Tq, H_b, D // H_b)
    q_b, k_b, gamma = oracle_feedback_inputs(sd, a_bar, gamma_max, H_b)
    logits = torch.einsum("bthd,bjhd->bhtj", q_b, k_b) / math.sqrt(D / H_b)
    strict = torch.ones(Tq, Tq, dtype=torch.bool).tril(-1)
    alpha = torch.zeros_like(logits)
    alpha[:, :, 1:] = torch.softmax(logits[:, :, 1:].masked_fill(~strict[1:], -math.inf), dim=-1)
    system = torch.eye(Tq) - gamma.permute(0, 2, 1)[..., None] * alpha  # (B, H_b, T, T)
    s = torch.linalg.solve_triangular(system, f.permute(0, 2, 1, 3), upper=False)
    return s.permute(0, 2, 1, 3).reshape(Bq, Tq, D)


def oracle_layer(sd, x, H, H_kv, H_b, rope, gamma_max, eps=1e-5):
    x_ln = torch.nn.functional.layer_norm(x, (D,), sd["ln.weight"], sd["ln.bias"], eps)
    h = linear(sd, "W_in", x_ln)
    a, g = h[..., :D], h[..., D:]
    a_bar = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    return x + linear(sd, "W_out", oracle_mixer(sd, a_bar, H, H_kv, H_b, rope, gamma_max) * g)


# ---------------------------------------------------------------------------------------------
# (a) the layer equals the oracle on reference state dicts loaded with strict=True

CASES = [  # (n_heads, n_kv_heads, n_fb_heads, rope, max_len)
    (1, None, 1, True, None),
    (1, None, 1, False, 32),
    (4, None, 1, True, 32),
    (4, None, 1, False, None),
    (4, 2, 1, True, None),
    (4, 2, 1, False, 32),
    (4, 2, 2, True, None),
]


@pytest.mark.parametrize("solver", ["dense", "auto"])
@pytest.mark.parametrize("H,H_kv,H_b,rope,max_len", CASES)
def test_layer_matches_oracle_on_reference_state_dict(H, H_kv, H_b, rope, max_len, solver):
    gamma_max = 0.95
    layer = SessaLayer(
        D, n_heads=H, n_kv_heads=H_kv, max_len=max_len, use_forward_rope=rope,
        gamma_max=gamma_max, n_fb_heads=H_b, solver=solver,
    ).double()  # also the float32 rope_inv_freq buffer, as for the reference
    sd = reference_state_dict(H, H_kv or H, H_b, rope, max_len)
    layer.load_state_dict(sd, strict=True)
    mask_keys = {"mixer.causal_mask_f_full", "mixer.causal_mask_fb_full"}
    assert set(layer.state_dict()) == set(sd) - mask_keys  # masks are derived, never stored
    assert layer.mixer.gamma_bias.shape == (H_b,)  # the reference's 0-dim gamma_bias loads as (1,)

    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    expected = oracle_layer(sd, x, H, H_kv or H, H_b, rope, gamma_max)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_strict_load_still_rejects_unknown_keys():
    layer = SessaLayer(D, n_heads=4)
    sd = reference_state_dict(4, 4, 1, True, None)
    sd["mixer.not_a_buffer"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="not_a_buffer"):
        layer.load_state_dict(sd, strict=True)


def test_rope_inv_freq_buffer_matches_reference():
    mixer = SessaMixer(D, n_heads=2)
    half, d = D // 4, D // 2
    expected = 10000 ** (-2 * torch.arange(half, dtype=torch.float32) / d)
    assert mixer.rope_inv_freq.dtype == torch.float32
    torch.testing.assert_close(mixer.rope_inv_freq, expected, rtol=0, atol=0)
    assert "rope_inv_freq" not in SessaMixer(D, n_heads=2, use_forward_rope=False).state_dict()


# ---------------------------------------------------------------------------------------------
# (b) prefill + decode_step reproduce the parallel forward


def _random_module(module_cls, H_b, seed=0):
    torch.manual_seed(seed)
    module = module_cls(D, n_heads=4, n_kv_heads=2, gamma_max=0.95, n_fb_heads=H_b)
    mixer = module.mixer if module_cls is SessaLayer else module
    with torch.no_grad():
        mixer.gamma_bias.fill_(1.5)  # strong feedback: gamma close to gamma_max
    return module


@pytest.mark.parametrize("module_cls", [SessaLayer, SessaMixer])
@pytest.mark.parametrize("H_b", [1, 2])
@pytest.mark.parametrize("T_total,n_prefill", [(1, 0), (1, 1), (17, 0), (17, 6)])
@pytest.mark.parametrize("step_shape", ["BD", "B1D"])
def test_prefill_and_decode_reproduce_forward(module_cls, H_b, T_total, n_prefill, step_shape):
    module = _random_module(module_cls, H_b)
    x = torch.randn(B, T_total, D)
    with torch.no_grad():
        full = module(x)
        cache = module.init_cache(B, max_len=T_total + 3)
        outputs = []
        if n_prefill:
            y, cache = module.prefill(x[:, :n_prefill], cache)
            outputs.append(y)
        for t in range(n_prefill, T_total):
            x_t = x[:, t] if step_shape == "BD" else x[:, t : t + 1]
            y_t, cache = module.decode_step(x_t, cache)
            assert y_t.shape == x_t.shape
            outputs.append(y_t.reshape(B, 1, D))
    assert cache["t"] == T_total
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=0, atol=1e-12)


def test_cache_layout_and_limits():
    layer = SessaLayer(D, n_heads=4, n_kv_heads=2, max_len=8)
    cache = layer.init_cache(B)
    assert cache["t"] == 0
    assert cache["k_f"].shape == cache["v_f"].shape == (B, 8, 2, D // 4)
    assert cache["k_b"].shape == cache["s"].shape == (B, 8, D)
    with pytest.raises(ValueError, match="max_len"):
        SessaLayer(D).init_cache(B)
    with pytest.raises(ValueError, match="does not fit"):
        layer.prefill(torch.randn(B, 9, D), layer.init_cache(B))
    _, cache = layer.prefill(torch.randn(B, 8, D), cache)
    with pytest.raises(ValueError, match="empty cache"):
        layer.prefill(torch.randn(B, 1, D), cache)
    with pytest.raises(ValueError, match="full"):
        layer.decode_step(torch.randn(B, D), cache)


# ---------------------------------------------------------------------------------------------
# (c) n_fb_heads = 1 is the spec's single feedback head of width D, scale 1/sqrt(D)


def test_single_feedback_head_is_the_literal_recurrence():
    gamma_max = 0.97
    mixer = SessaMixer(D, n_heads=4, gamma_max=gamma_max, n_fb_heads=1).double()
    sd = {k.removeprefix("mixer."): v for k, v in reference_state_dict(4, 4, 1, True, None).items()
          if k.startswith("mixer.")}
    mixer.load_state_dict(sd, strict=True)
    a_bar = torch.randn(B, T, D)

    sd_full = {"mixer." + k: v for k, v in sd.items()}
    f = oracle_forward_branch(sd_full, a_bar, 4, 4, True)
    fb = linear(sd_full, "mixer.proj_fb", a_bar)
    q_b, k_b = fb[..., :D], fb[..., D:]
    gamma = gamma_max * torch.tanh(sd["gamma_bias"] + a_bar @ sd["gamma_ctx.weight"][0])  # (B, T)
    s = []
    for t in range(T):  # s[t] = f[t] + gamma[t] * sum_{j<t} softmax_j(q_b[t].k_b[j] / sqrt(D)) s[j]
        s_t = f[:, t]
        if t > 0:
            alpha = torch.softmax(torch.einsum("bd,bjd->bj", q_b[:, t], k_b[:, :t]) / math.sqrt(D), dim=-1)
            s_t = s_t + gamma[:, t, None] * torch.einsum("bj,bjd->bd", alpha, torch.stack(s, dim=1))
        s.append(s_t)
    torch.testing.assert_close(mixer(a_bar), torch.stack(s, dim=1), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (d) constructor validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(D=18, n_heads=4), "divisible by n_heads"),
        (dict(D=16, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(D=16, n_heads=4, n_kv_heads=8), "n_kv_heads"),
        (dict(D=16, n_heads=4, n_kv_heads=0), "n_kv_heads"),
        (dict(D=12, n_heads=4), "even head dim"),
        (dict(D=16, gamma_max=1.0), "gamma_max"),
        (dict(D=16, gamma_max=0.0), "gamma_max"),
        (dict(D=16, n_fb_heads=3), "n_fb_heads"),
        (dict(D=16, solver="nope"), "solver"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessaLayer(**kwargs)


def test_odd_head_dim_is_fine_without_rope():
    layer = SessaLayer(12, n_heads=4, use_forward_rope=False)
    assert layer(torch.randn(1, 3, 12)).shape == (1, 3, 12)


def test_flash_backend_unavailable_is_a_user_error():
    layer = SessaLayer(D, n_heads=2, use_flash=True)
    with pytest.raises(UserError, match=r"model\.attention"):
        layer(torch.randn(1, 3, D))
