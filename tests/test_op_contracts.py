"""Contracts of the fused ops, on CPU: input validation (clear errors before any kernel runs),
backend selection, the memory contract (autograd never keeps a normalised / activated
tensor) and the stage-kernel layout/precision contract."""

import pytest
import torch
import torch.nn.functional as F

from fusedres.ops import backends, functional, torch_backend
from op_helpers import EPS, F32, F64, assert_close, fused_bottleneck, make_block, positive, randn, stats_of


# --------------------------------------------------------------------------- errors
@pytest.fixture
def no_kernels(monkeypatch):
    """Any stage kernel running fails the test: errors must come before kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for name in ("channel_stats", "act_forward", "backward_reduce", "backward_apply"):
        monkeypatch.setattr(torch_backend, name, forbidden)


def pending(gen, shape=(2, 3, 4, 5), dtype=F32, requires_grad=False):
    y = randn(gen, *shape, dtype=dtype, requires_grad=requires_grad)
    c = shape[1]
    return functional.PendingBN(y, *stats_of(y), positive(gen, c, dtype=dtype),
                                randn(gen, c, dtype=dtype), True)


def stats_call(y, weight=None, bias=None, running_mean=None, running_var=None, batch_stats=True,
               backend="auto"):
    return functional.batch_norm_stats(y, weight, bias, running_mean, running_var,
                                       batch_stats=batch_stats, momentum=0.1, eps=EPS,
                                       backend=backend)


def test_error_3d_input(no_kernels):
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\).*got 3D"):
        stats_call(torch.randn(2, 3, 4))


def test_error_int_dtype(no_kernels):
    with pytest.raises(TypeError, match="floating dtype.*torch.int64"):
        stats_call(torch.ones(2, 3, 4, 5, dtype=torch.long))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_error_channel_vector_size(name, no_kernels):
    gen = torch.Generator().manual_seed(1)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    kwargs = dict(weight=torch.ones(3), bias=torch.ones(3) * 0.1, running_mean=torch.ones(3) * 0.2,
                  running_var=torch.ones(3) * 1.5)
    kwargs[name] = torch.ones(4)
    with pytest.raises(ValueError, match=f"{name} should contain 3 elements.*not 4"):
        stats_call(y, **kwargs)


def test_error_running_mean_without_running_var(no_kernels):
    gen = torch.Generator().manual_seed(2)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    running_mean = torch.full((3,), 0.25)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        stats_call(y, running_mean=running_mean)
    assert torch.equal(running_mean, torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="running statistics are required"):
        stats_call(y, batch_stats=False)


def test_error_one_value_per_channel_when_training(no_kernels):
    gen = torch.Generator().manual_seed(3)
    y = randn(gen, 1, 3, 1, 1, dtype=F32)
    with pytest.raises(ValueError) as torch_err:
        F.batch_norm(y, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"
                       ) as ours:
        stats_call(y)
    assert str(ours.value) == str(torch_err.value)


def test_error_residual_shape(no_kernels):
    gen = torch.Generator().manual_seed(4)
    p = pending(gen)
    with pytest.raises(ValueError, match=r"residual of size \(2, 3, 4, 4\) does not match"):
        functional.bn_act(p, randn(gen, 2, 3, 4, 4, dtype=F32))
    with pytest.raises(ValueError, match=r"shortcut of size \(2, 3, 4, 4\) does not match"):
        functional.bn_act(p, pending(gen, (2, 3, 4, 4)))


def test_error_residual_device(no_kernels):
    gen = torch.Generator().manual_seed(5)
    p = pending(gen)
    with pytest.raises(RuntimeError, match="expected residual to be on cpu.*got meta"):
        functional.bn_act(p, torch.empty(2, 3, 4, 5, device="meta"))
    with pytest.raises(RuntimeError, match="expected weight to be on cpu.*got meta"):
        stats_call(p.y, weight=torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="expected conv_weight to be on cpu.*got meta"):
        functional.bn_act_conv2d(p, torch.empty(4, 3, 3, 3, device="meta"))


def test_error_shortcut_batch_stats_mismatch(no_kernels):
    gen = torch.Generator().manual_seed(6)
    p = pending(gen)
    sc = pending(gen)._replace(batch_stats=False)
    with pytest.raises(ValueError, match="both BatchNorms must use batch statistics"):
        functional.bn_act(p, sc)


def test_error_conv_weight_channels(no_kernels):
    gen = torch.Generator().manual_seed(7)
    p = pending(gen)
    with pytest.raises(RuntimeError, match=r"expects 4 input channels, got 3"):
        functional.bn_act_conv2d(p, randn(gen, 8, 4, 3, 3, dtype=F32))
    with pytest.raises(ValueError, match="4D conv weight"):
        functional.bn_act_conv2d(p, randn(gen, 8, 3, 3, dtype=F32))
    with pytest.raises(ValueError, match=r"conv_bias should have size \(8,\)"):
        functional.bn_act_conv2d(p, randn(gen, 8, 3, 3, 3, dtype=F32), randn(gen, 7, dtype=F32))


def test_error_groups_not_dividing(no_kernels):
    gen = torch.Generator().manual_seed(8)
    p = pending(gen)
    with pytest.raises(ValueError, match="groups=2 must divide the 3 input"):
        functional.bn_act_conv2d(p, randn(gen, 4, 1, 3, 3, dtype=F32), groups=2)


def test_error_padding_same(no_kernels):
    gen = torch.Generator().manual_seed(9)
    p = pending(gen)
    with pytest.raises(ValueError, match="padding='same' is not supported"):
        functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F32), padding="same")


def test_error_conv_dtype_mismatch(no_kernels):
    gen = torch.Generator().manual_seed(10)
    p = pending(gen)
    with pytest.raises(RuntimeError, match=r"input type \(torch.float32\) and weight type "
                                           r"\(torch.float64\) should be the same"):
        functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F64))


def test_conv_dtype_follows_autocast():
    """Inside autocast the weight is cast like conv2d would be; no dtype error."""
    gen = torch.Generator().manual_seed(11)
    p = pending(gen)
    cw = randn(gen, 4, 3, 3, 3, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = functional.bn_act_conv2d(p, cw, padding=1)
        expected = F.conv2d(functional.bn_act(p), cw, padding=1)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("where", ["batch_norm_stats", "bn_act", "bn_act_conv2d"])
def test_error_unknown_backend(where, no_kernels):
    gen = torch.Generator().manual_seed(12)
    p = pending(gen)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        if where == "batch_norm_stats":
            stats_call(p.y, backend="nope")
        elif where == "bn_act":
            functional.bn_act(p, backend="nope")
        else:
            functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F32), backend="nope")


def test_error_cuda_backend_on_cpu(no_kernels):
    gen = torch.Generator().manual_seed(13)
    p = pending(gen)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        stats_call(p.y, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        functional.bn_act(p, backend="cuda")


# --------------------------------------------------------------------------- backend selection
def test_select_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    for dtype in (F32, F64, torch.bfloat16):
        assert backends.select("auto", torch.ones(2, dtype=dtype)) is torch_backend
    assert backends.select("torch", torch.ones(2)) is torch_backend


def test_select_honours_env_var(monkeypatch):
    x = torch.ones(2)
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    assert backends.select("auto", x) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        backends.select("auto", x)
    # an explicit name wins over the variable
    assert backends.select("torch", x) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.select("auto", x)


def test_env_var_reaches_the_ops(monkeypatch):
    gen = torch.Generator().manual_seed(14)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        stats_call(y)
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    stats_call(y)


def test_select_fp64_falls_back_to_torch(monkeypatch):
    """A kernel backend that can run on the device still hands fp64 to the torch backend."""
    fake_kernels = object()
    real_load = backends._load

    def fake_load(name):
        return (fake_kernels, "fake") if name == "triton" else real_load(name)

    monkeypatch.setattr(backends, "_load", fake_load)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    assert backends.select("triton", torch.ones(2, dtype=F32)) is fake_kernels
    assert backends.select("triton", torch.ones(2, dtype=F64)) is torch_backend
    # the interpreter is never an automatic choice
    assert backends.select("auto", torch.ones(2, dtype=F32)) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "triton")
    assert backends.select("auto", torch.ones(2, dtype=F64)) is torch_backend


# --------------------------------------------------------------------------- memory contract
def saved_tensors_of(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@pytest.mark.parametrize("downsample,channels_last", [(True, False), (False, True)],
                         ids=["down-nchw", "identity-cl"])
def test_memory_efficient_bottleneck_saves_no_normalised_activation(downsample, channels_last):
    inplanes, planes = (12, 5) if downsample else (20, 5)
    block = make_block("bottleneck", inplanes, planes, 2 if downsample else 1, downsample, F32,
                       seed=21)
    gen = torch.Generator().manual_seed(22)
    x = randn(gen, 3, inplanes, 7, 9, dtype=F32, channels_last=channels_last, requires_grad=True)
    record = []
    out, saved = saved_tensors_of(lambda: fused_bottleneck(x, block, True, record))
    p1, p2, p3, res = record
    allowed = [x, p1.y, p2.y, p3.y] + ([res.y] if downsample else [])
    params = list(block.parameters())
    activations = [t for t in saved
                   if t.dim() == 4 and not any(same_tensor(t, p) for p in params)]
    assert activations, "the hooks saw no saved activation"
    for t in activations:
        assert any(same_tensor(t, a) for a in allowed), (
            f"autograd saved an activation-sized tensor of size {tuple(t.shape)} that is not "
            "the block input or a conv output")
    # every conv output is needed (and kept) for the backward; nothing else of that size
    for name, a in (("y1", p1.y), ("y2", p2.y), ("y3", p3.y)):
        assert any(same_tensor(t, a) for t in activations), f"{name} was not saved"
    # and, by value, neither bn1's nor bn2's normalised / activated output is kept
    with torch.no_grad():
        for p in (p1, p2):
            scale = p.invstd * p.weight
            z = ((p.y - p.mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
                 + p.bias.view(1, -1, 1, 1))
            for normalised in (z, z.relu()):
                for t in saved:
                    assert not (t.shape == normalised.shape
                                and torch.allclose(t.float(), normalised, atol=1e-5)), (
                        "a normalised activation was saved for backward")
    out.backward(torch.ones_like(out))  # the saved set suffices for the backward


def test_identity_residual_not_saved_without_relu():
    gen = torch.Generator().manual_seed(23)
    p = pending(gen, requires_grad=True)
    residual = randn(gen, 2, 3, 4, 5, dtype=F32, requires_grad=True)
    out, saved = saved_tensors_of(lambda: functional.bn_act(p, residual, relu=False))
    assert any(same_tensor(t, p.y) for t in saved)
    assert not any(same_tensor(t, residual) for t in saved)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))


# --------------------------------------------------------------------------- kernel contract
def check_layout_contract(fn_name, y, *activations, vectors=()):
    """torch_backend's documented contract, which every backend may rely on: y contiguous
    NCHW or channels_last; residual / grad_out of y's shape and memory format; per-channel
    vectors contiguous in the compute dtype."""
    fmt = torch.contiguous_format if y.is_contiguous() else torch.channels_last
    y_ok = y.is_contiguous(memory_format=fmt)
    assert y_ok, f"{fn_name}: y of stride {y.stride()}"
    for name, t in activations:
        if t is not None:
            ok = t.shape == y.shape and t.is_contiguous(memory_format=fmt)
            assert ok, (f"{fn_name}: {name} of stride {t.stride()} does not have the memory "
                        f"format of y (stride {y.stride()})")
    cdt = F64 if y.dtype == F64 else F32
    for name, v in vectors:
        if v is not None:
            ok = v.is_contiguous() and v.dtype == cdt
            assert ok, f"{fn_name}: {name} {v.dtype} {v.stride()}"


@pytest.fixture
def contract_checked_kernels(monkeypatch):
    real = {name: getattr(torch_backend, name)
            for name in ("channel_stats", "act_forward", "backward_reduce", "backward_apply")}

    def channel_stats(y):
        check_layout_contract("channel_stats", y)
        return real["channel_stats"](y)

    def act_forward(y, scale, shift, residual, res_scale, res_shift, relu):
        check_layout_contract("act_forward", y, ("residual", residual), vectors=(
            ("scale", scale), ("shift", shift), ("res_scale", res_scale), ("res_shift", res_shift)))
        return real["act_forward"](y, scale, shift, residual, res_scale, res_shift, relu)

    def backward_reduce(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, mean,
                        res_mean):
        check_layout_contract("backward_reduce", y, ("grad_out", grad_out), ("residual", residual),
                              vectors=(("scale", scale), ("shift", shift), ("mean", mean)))
        return real["backward_reduce"](grad_out, y, scale, shift, residual, res_scale, res_shift,
                                       relu, mean, res_mean)

    def backward_apply(grad_out, y, *rest):
        check_layout_contract("backward_apply", y, ("grad_out", grad_out), ("residual", rest[2]))
        return real["backward_apply"](grad_out, y, *rest)

    for name, fn in (("channel_stats", channel_stats), ("act_forward", act_forward),
                     ("backward_reduce", backward_reduce), ("backward_apply", backward_apply)):
        monkeypatch.setattr(torch_backend, name, fn)


@pytest.mark.parametrize("channels_last,grad_kind", [
    (False, "same-layout"), (True, "same-layout"), (True, "other-layout"), (False, "sum-loss"),
], ids=["nchw-same-layout", "cl-same-layout", "cl-nchw-grad", "nchw-sum-loss"])
def test_kernels_receive_documented_layout(contract_checked_kernels, channels_last, grad_kind):
    """Whatever gradient autograd hands the ops, the stage kernels get it in y's layout.

    The Triton and CUDA kernels index grad_out with y's strides (the Triton backend rejects
    anything else), so e.g. ``out.sum().backward()`` (a stride-0 gradient) must be made
    contiguous in y's memory format before the kernels run.
    """
    block = make_block("bottleneck", 12, 5, 2, True, F32, seed=31)
    gen = torch.Generator().manual_seed(32)
    x = randn(gen, 3, 12, 7, 9, dtype=F32, channels_last=channels_last, requires_grad=True)
    out = fused_bottleneck(x, block)
    if grad_kind == "sum-loss":
        out.sum().backward()
    else:
        other = channels_last if grad_kind == "same-layout" else not channels_last
        out.backward(randn(gen, *out.shape, dtype=F32, channels_last=other))
    assert x.grad is not None


def test_mixed_layouts_reach_kernels_in_y_layout(contract_checked_kernels):
    """A residual / shortcut in another memory format than y, and a non-contiguous y, are
    brought to kernel layout by the functional API, with unchanged values."""
    gen = torch.Generator().manual_seed(33)
    base = randn(gen, 2, 3, 6, 5, dtype=F64)
    y_strided = base[:, :, ::2]  # neither NCHW- nor channels_last-contiguous
    w, b = positive(gen, 3), randn(gen, 3)
    p = functional.batch_norm_stats(y_strided, w, b, None, None, batch_stats=True, momentum=0.1,
                                    eps=EPS)
    assert p.y.is_contiguous()
    torch.testing.assert_close(p.y, y_strided, rtol=0, atol=0)
    y_cl = randn(gen, 2, 3, 3, 5, dtype=F64, channels_last=True)
    p_cl = functional.batch_norm_stats(y_cl, w, b, None, None, batch_stats=True, momentum=0.1,
                                       eps=EPS)
    residual = randn(gen, 2, 3, 3, 5, dtype=F64, channels_last=False)
    sc = functional.batch_norm_stats(randn(gen, 2, 3, 3, 5, dtype=F64), positive(gen, 3),
                                     randn(gen, 3), None, None, batch_stats=True, momentum=0.1,
                                     eps=EPS)
    for res in (residual, sc):
        out = functional.bn_act(p_cl, res)
        assert out.is_contiguous(memory_format=torch.channels_last)
        z = F.batch_norm(y_cl, None, None, w, b, True, 0.1, EPS)
        r = res if isinstance(res, torch.Tensor) else F.batch_norm(
            res.y, None, None, res.weight, res.bias, True, 0.1, EPS)
        assert_close(out, (z + r).relu(), F64, "output")


def test_relu_gradient_at_exact_zero_matches_torch():
    """Where bn(y) + residual is exactly 0, ReLU passes no gradient (as torch's relu)."""
    gen = torch.Generator().manual_seed(34)
    y = randn(gen, 2, 3, 4, 5, requires_grad=True)
    mask = torch.rand(2, 3, 4, 5, generator=gen) < 0.5
    residual = torch.where(mask, -y.detach(), randn(gen, 2, 3, 4, 5)).requires_grad_()
    mean, invstd = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)  # bn(y) = y exactly
    out = functional.bn_act(functional.PendingBN(y, mean, invstd, None, None, False), residual)
    y_ref, res_ref = y.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    out_ref = torch.relu(y_ref + res_ref)
    assert (out_ref[mask] == 0).all()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    g = randn(gen, 2, 3, 4, 5)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(residual.grad, res_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_apply_is_centred_so_large_means_do_not_cancel(backend):
    """dy = dz*c0 + (y - mean)*c1 + c2 in fp32 stays near fp64 with mean 1000, std 0.1.

    Measured: 2.0e-5 relative error centred (bounded by the fp32-rounded mean itself), 6.4e-5
    for the uncentred y*c1 + (c2 - mean*c1).
    """
    from fusedres.ops.backends import select

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else the interpreter
    kernels = select(backend, torch.empty(0, device=device))
    gen = torch.Generator().manual_seed(11)
    y = 1000 + 0.1 * torch.randn(3, 5, 4, 6, generator=gen)
    dz = torch.randn(3, 5, 4, 6, generator=gen)
    y64 = y.double()
    mean = y64.mean((0, 2, 3))
    invstd = (y64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    sum_dz, sum_dz_yc = dz.double().sum((0, 2, 3)), (dz.double() * (y64 - mean.view(1, -1, 1, 1))).sum((0, 2, 3))
    coef = torch_backend.backward_coefficients(sum_dz, sum_dz_yc, sum_dz, sum_dz_yc, mean, invstd, None, None,
                                               y.numel() // 5, True)[0]  # no weight
    ones, zeros = torch.ones(5), torch.zeros(5)
    # the reference: torch's own BatchNorm backward in fp64, not the torch backend (whose backward_apply is one of
    # the two run here)
    y_leaf = y64.clone().requires_grad_()
    exact, = torch.autograd.grad(F.batch_norm(y_leaf, None, None, training=True, eps=1e-5), y_leaf, dz.double())
    dy, _ = kernels.backward_apply(*(t.to(device) for t in (dz, y, ones, zeros)), None, None, None, False,
                                   coef.float().to(device), None, False)
    error = (dy.double().cpu() - exact).norm() / exact.norm()
    assert error < 4e-5, error
