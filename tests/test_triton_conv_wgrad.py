"""fusedres.triton.conv_wgrad against aten.convolution_backward evaluated in fp64.

Without CUDA the kernel runs under the Triton interpreter on CPU tensors, so TRITON_INTERPRET must be
set before triton is imported; with CUDA the same tests run on the GPU. A weight gradient passes when
its largest error against the fp64 reference is at most twice that of eager torch computing the same
thing in the same dtype, plus ATOL[dtype] times the reference's largest magnitude (the rule of
test_triton_conv.py). The conv input the reference sees is the prologue computed in fp64 and rounded
to x's dtype, as the kernel feeds its dot a tensor in x's dtype.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from triton_conv_helpers import (ATOL, BF16, DEVICE, F16, F32, F64, LAYER1_3X3, LAYER1_3X3_CHANNELS_LAST_STRIDES,
                                 assert_pipelined, compile_for_sm90, compile_launch_like_for_sm90, conv_input,
                                 geometry_id, named_strides, out_hw, pair, rand_act, rand_vec, seeded,
                                 tf32_allowance)
from fusedres.triton import conv, conv_args, conv_wgrad


@dataclass(frozen=True)
class Case:
    c: int
    k: int
    hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dtype: torch.dtype
    x_channels_last: bool
    dy_channels_last: bool
    prologue: str  # "none", "relu" or "linear" (in_relu=False)
    dilation: tuple = (1, 1)
    groups: int = 1
    n: int = 2

    def __str__(self):
        layouts = "-".join("cl" if cl else "nchw" for cl in (self.x_channels_last, self.dy_channels_last))
        return f"n{self.n}{geometry_id(self)}-{str(self.dtype)[6:]}-x_dy_{layouts}-in_{self.prologue}"


def _case(c, k, hw, kernel, stride, padding, dtype, x_cl, dy_cl, prologue, dilation=1, groups=1, n=2):
    return Case(c, k, pair(hw), pair(kernel), pair(stride), pair(padding), dtype, x_cl, dy_cl, prologue,
                pair(dilation), groups, n)


# C, K in {3, 8, 20, 24, 32, 48}: tails of the interpreter's 16-wide channel blocks, and the flat
# (r, s, c) columns for C / groups < 16. Every dtype meets every prologue kind and both layouts of x
# and of dy.
CASES = [
    _case(20, 24, 7, 1, 1, 0, F32, False, True, "relu"),
    _case(24, 20, 9, 1, 2, 0, BF16, True, False, "none"),
    _case(20, 20, 7, 3, 1, 1, F16, True, True, "relu"),
    _case(24, 8, 9, 3, 2, 1, BF16, False, False, "linear"),
    _case(3, 20, 9, 7, 2, 3, F32, True, False, "none"),
    _case(3, 8, (9, 8), 7, 2, 3, BF16, True, True, "relu"),
    _case(20, 8, 9, 3, 1, 2, F32, False, True, "relu", dilation=2),
    _case(20, 20, (5, 7), (3, 5), (2, 1), (1, 2), F32, True, False, "linear"),
    _case(8, 20, (7, 6), (5, 3), (1, 2), (2, 0), F16, False, False, "relu", dilation=(1, 2)),
    _case(32, 32, 5, 3, 1, 1, BF16, True, True, "relu", groups=2),
    _case(32, 48, 5, 1, 2, 0, F16, False, True, "linear", groups=2),
    _case(8, 8, 5, 3, 1, 1, F16, False, False, "none"),
    _case(16, 16, 13, 1, 1, 0, F32, False, False, "relu"),  # M = 338: several BLOCK_M steps per split
    # narrow groups run several as one (conv_args._merge_factor): the gradient's diagonal blocks kept
    _case(64, 64, 6, 3, 1, 1, BF16, True, True, "relu", groups=16),  # ResNeXt's 4 channels: all 16 as one
    _case(128, 128, 7, 3, 2, 1, F16, True, False, "linear", groups=8),  # 16 channels: 2 merged groups
    _case(20, 28, 6, 3, 1, 1, F32, False, True, "none", groups=4),  # 5 in / 7 out: 20 / 28, tails
    # strided ungrouped convs of few channels run space-to-depth, as the forward (the stem: the 7x7/2 cases
    # above too), a prologue applied to the copy (the C = 3 "relu" case above)
    _case(3, 16, (11, 9), 7, 2, 3, BF16, False, True, "none"),  # NCHW x; odd P, Q
    _case(5, 8, (9, 8), 3, (2, 1), (0, 1), F32, True, False, "none"),  # row stride only: C' = 8
    _case(3, 8, 13, 2, 3, 0, F16, True, True, "none"),  # the blocks' image ends before x's last row
]


def _make(case):
    """Random non-zero x, grad_out, the weight shape and the keyword arguments, seeded by the case id."""
    gen = seeded(case)
    x = rand_act(gen, (case.n, case.c, *case.hw), case.dtype, case.x_channels_last)
    dy = rand_act(gen, (case.n, case.k, *out_hw(case)), case.dtype, case.dy_channels_last)
    weight_shape = (case.k, case.c // case.groups, *case.kernel)
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    if case.prologue != "none":
        kw.update(in_scale=rand_vec(gen, case.c, positive=True), in_shift=rand_vec(gen, case.c) * 0.5,
                  in_relu=case.prologue == "relu")
    return x, dy, weight_shape, kw


def _torch_wgrad(x, dy, weight_shape, kw, dtype, absolute=False):
    """torch's weight gradient, with x' and dy converted to dtype (F64: the reference; x's dtype: eager);
    absolute: of |x'| and |dy|, the sums of |products| behind each dW value."""
    xp, dy = conv_input(x, kw).to(dtype), dy.to(dtype)
    if absolute:
        xp, dy = xp.abs(), dy.abs()
    w = torch.zeros(weight_shape, device=x.device, dtype=dtype)
    return torch.ops.aten.convolution_backward(
        dy, xp, w, None, list(pair(kw.get("stride", 1))), list(pair(kw.get("padding", 0))),
        list(pair(kw.get("dilation", 1))), False, [0, 0], kw.get("groups", 1), [False, True, False])[1]


def _check(dw, x, dy, weight_shape, kw, what=""):
    """dw is contiguous in x's dtype and meets the error rule against the fp64 reference."""
    ref = _torch_wgrad(x, dy, weight_shape, kw, F64)
    eager = _torch_wgrad(x, dy, weight_shape, kw, x.dtype)
    assert dw.dtype == x.dtype and dw.shape == ref.shape and dw.device == x.device and dw.is_contiguous()
    assert torch.isfinite(dw).all()
    err = (dw.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    magnitude = _torch_wgrad(x, dy, weight_shape, kw, F64, absolute=True).max().item()
    bound = 2 * eager_err + ATOL[x.dtype] * max(1.0, ref.abs().max().item()) + tf32_allowance(x.dtype, magnitude)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager's error {eager_err:.3g})"


def _geo_args(case):
    return case.stride, case.padding, case.dilation, case.groups


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv2d_weight_grad(case):
    x, dy, weight_shape, kw = _make(case)
    assert conv_wgrad.unsupported_reason(x, dy, weight_shape, *_geo_args(case)) is None
    dw = conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw)
    _check(dw, x, dy, weight_shape, kw, str(case))


@pytest.mark.parametrize("in_relu", [True, False], ids=["relu", "linear"])
def test_padding_after_prologue(in_relu):
    """A large positive shift: relu(0 * s + t) = t at padded positions would move every border column."""
    gen = seeded(f"padding-{in_relu}")
    x = rand_act(gen, (2, 8, 5, 5), F32, channels_last=True)
    dy = rand_act(gen, (2, 20, 5, 5), F32)
    kw = dict(padding=(2, 1), dilation=(2, 1), in_scale=rand_vec(gen, 8, positive=True),
              in_shift=rand_vec(gen, 8, positive=True) + 3.0, in_relu=in_relu)
    dw = conv_wgrad.conv2d_weight_grad(x, dy, (20, 8, 3, 3), **kw)
    _check(dw, x, dy, (20, 8, 3, 3), kw)
    s, t = kw["in_scale"].double()[:, None, None], kw["in_shift"].double()[:, None, None]
    v = F.pad(x.double(), (1, 1, 2, 2)) * s + t  # the prologue applied after padding
    wrong = _torch_wgrad(v.relu() if in_relu else v, dy, (20, 8, 3, 3), dict(dilation=(2, 1)), F64)
    assert (dw.double() - wrong).abs().max() > 1.0


@pytest.mark.parametrize("c,channels_last,stride", [(20, False, 1), (3, True, 1), (3, True, 2)],
                         ids=["c20-nchw", "c3-cl", "c3-cl-stride2"])
def test_columns_are_the_rounded_prologue(c, channels_last, stride):
    """dy is one-hot: output channel k sees the gradient 1 at one position m_k (spread over both images),
    so dW[k, :, r, s] is x' at that position's (r, s) input window, exactly: x' = relu(x * s + t) computed
    in fp32 and rounded to fp16 (torch and the interpreter round fp16 to nearest), the sum over the
    other rows adds zeros. Checks the (r, s, c) column decode of both paths, the space-to-depth one
    (stride 2 on 3 channels, its prologue applied to the copy) and the padding."""
    gen = seeded(f"one-hot-{c}-{channels_last}-{stride}")
    x = rand_act(gen, (2, c, 5, 4), F16, channels_last)
    s, t = rand_vec(gen, c, positive=True), rand_vec(gen, c)
    k, p, q = 12, 4 // stride + 1, 3 // stride + 1
    dy = torch.zeros(2, k, p, q, device=DEVICE, dtype=F16)
    positions = [divmod((3 * i + 1) % (2 * p * q), p * q) for i in range(k)]  # (n, p*Q + q) of 2*P*Q
    for i, (n, pq) in enumerate(positions):
        dy[n, i, pq // q, pq % q] = 1.0
    dw = conv_wgrad.conv2d_weight_grad(x, dy, (k, c, 3, 3), stride=stride, padding=1, in_scale=s, in_shift=t)
    xp = F.pad((x.float() * s[:, None, None] + t[:, None, None]).relu().half(), (1, 1, 1, 1))
    want = torch.stack([xp[n, :, pq // q * stride:pq // q * stride + 3, pq % q * stride:pq % q * stride + 3]
                        for n, pq in positions])
    assert torch.equal(dw, want)


def test_nan_propagates_through_the_prologue():
    """A NaN input passes relu (as clamp_min does) into exactly the weight-gradient entries whose
    window covers it; padding around it stays 0."""
    gen = seeded("nan")
    x = rand_act(gen, (2, 20, 5, 5), F32, channels_last=True)
    x[1, 3, 0, 4] = float("nan")
    dy = rand_act(gen, (2, 8, 5, 5), F32)
    kw = dict(padding=1, in_scale=rand_vec(gen, 20, positive=True), in_shift=rand_vec(gen, 20))
    dw = conv_wgrad.conv2d_weight_grad(x, dy, (8, 20, 3, 3), **kw)
    ref = _torch_wgrad(x, dy, (8, 20, 3, 3), kw, F64)
    assert ref.isnan().any() and torch.equal(dw.isnan(), ref.isnan())
    size = _torch_wgrad(x, dy, (8, 20, 3, 3), kw, F64, absolute=True).nan_to_num().max().item()
    torch.testing.assert_close(dw.double().nan_to_num(), ref.nan_to_num(), rtol=1e-5,
                               atol=1e-5 + tf32_allowance(F32, size))


def test_split_k(monkeypatch):
    """The rows are reduced in more than one split (under the interpreter 4 of 64 rows for M = 242, so
    2 BLOCK_M steps each, the very last one partial; on a GPU, which splits only past 2 * 512 rows, 3 of
    384 rows for M = 1936) and the sum matches a single-split launch up to fp32 rounding; repeated calls
    give identical bits (no atomics)."""
    n = 2 if DEVICE == "cpu" else 16
    case = _case(16, 20, 11, 3, 1, 1, F32, True, False, "relu", n=n)
    x, dy, weight_shape, kw = _make(case)
    chosen = []

    def spy(geo, device, flat):
        chosen.append((geo["M"], real(geo, device, flat)))
        return chosen[-1][1]

    real = conv_wgrad._rows_per_split
    monkeypatch.setattr(conv_wgrad, "_rows_per_split", spy)
    dw = conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw)
    ((m, rows_per_split),) = chosen
    assert m == n * 11 * 11 and m > rows_per_split
    assert rows_per_split % max(cfg.kwargs["BLOCK_M"] for cfg in conv_wgrad._CONFIGS) == 0
    _check(dw, x, dy, weight_shape, kw)
    assert torch.equal(dw, conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw))
    monkeypatch.setattr(conv_wgrad, "_rows_per_split", lambda geo, device, flat: 1 << 20)
    one_split = conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw)
    torch.testing.assert_close(dw, one_split, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,c,k,h,split", [(8, 64, 64, 56, True), (1, 64, 64, 8, False), (8, 512, 512, 7, False)],
                         ids=["many-rows", "few-rows", "many-tiles"])
def test_gpu_split_heuristic(n, c, k, h, split, monkeypatch):
    """The split count of a 3x3 conv on a 132-SM GPU (host arithmetic only, with this process's configs):
    splits cover whole BLOCK_M steps of every config and launch at least _SPLIT_WAVES programs per SM
    with the largest tiles, unless that leaves fewer than _MIN_ROWS_PER_SPLIT rows per split; M = 64
    rows or a dW of many tiles is not split."""
    monkeypatch.setattr(conv_wgrad, "_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    geo = conv._geometry(torch.empty(n, c, h, h), torch.empty(k, c, 3, 3), 1, 1, 1, 1)
    rows_per_split = conv_wgrad._rows_per_split(geo, "cuda", flat=False)
    splits = -(-geo["M"] // rows_per_split)
    fewest_tiles = conv_wgrad._tiles(geo, *(max(cfg.kwargs[b] for cfg in conv_wgrad._CONFIGS)
                                            for b in ("BLOCK_N", "BLOCK_K")), flat=False)
    assert all(rows_per_split % cfg.kwargs["BLOCK_M"] == 0 for cfg in conv_wgrad._CONFIGS)
    assert (splits * fewest_tiles >= conv_wgrad._SPLIT_WAVES * 132
            or rows_per_split <= conv_wgrad._MIN_ROWS_PER_SPLIT)
    assert (splits > 1) == split


@pytest.mark.parametrize("prologue", [False, True], ids=["stem", "prologue"])
def test_the_stem_runs_space_to_depth(prologue, monkeypatch):
    """A 7x7/2 conv on 3 channels takes its gradient through the space-to-depth copy of x (as the forward
    does), a prologue applied to the copy."""
    copies = []
    space_to_depth = conv_wgrad._space_to_depth
    monkeypatch.setattr(conv_wgrad, "_space_to_depth", lambda *args: copies.append(1) or space_to_depth(*args))
    case = _case(3, 8, 9, 7, 2, 3, F32, True, True, "relu" if prologue else "none")
    x, dy, weight_shape, kw = _make(case)
    _check(conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw), x, dy, weight_shape, kw, str(case))
    assert len(copies) == 1


def test_unsupported_reason(monkeypatch):
    x = torch.randn(2, 32, 5, 5, device=DEVICE)
    dy = torch.randn(2, 16, 5, 5, device=DEVICE)
    args = (1, 1, 1, 1)
    assert conv_wgrad.unsupported_reason(x, dy, (16, 32, 3, 3), *args) is None
    reason = conv_wgrad.unsupported_reason(x.double(), dy.double(), (16, 32, 3, 3), *args)
    assert reason.startswith("conv2d_weight_grad: x has dtype torch.float64")
    assert "grad_out has dtype torch.float16" in conv_wgrad.unsupported_reason(x, dy.half(), (16, 32, 3, 3), *args)
    assert "grad_out must have the conv output's shape (2, 16, 3, 3)" in conv_wgrad.unsupported_reason(
        x, dy, (16, 32, 3, 3), 1, 0, 1, 1)
    assert "does not fit" in conv_wgrad.unsupported_reason(x, dy, (16, 16, 3, 3), *args)
    assert conv_wgrad.unsupported_reason(x, dy, (16, 4, 3, 3), 1, 1, 1, 8) is None  # all 8 groups as one
    depthwise_34 = torch.randn(2, 34, 5, 5, device=DEVICE), torch.randn(2, 34, 5, 5, device=DEVICE)  # 2 x 17
    assert "1 input / 1 output channels per group, 2 / 2 with 2 groups run as one" in conv_wgrad.unsupported_reason(
        *depthwise_34, (34, 1, 3, 3), 1, 1, 1, 34)
    assert "too small" in conv_wgrad.unsupported_reason(x, dy, (16, 32, 3, 3), 1, 0, 3, 1)
    assert "empty" in conv_wgrad.unsupported_reason(x[:0], dy[:0], (16, 32, 3, 3), *args)
    assert "weight_shape must be 4" in conv_wgrad.unsupported_reason(x, dy, (16, 32, 3), *args)
    if DEVICE == "cpu":
        monkeypatch.setattr(conv_args, "_INTERPRET", False)
        assert "CUDA tensor" in conv_wgrad.unsupported_reason(x, dy, (16, 32, 3, 3), *args)


def test_rejects_bad_inputs():
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    dy = torch.randn(2, 4, 3, 3, device=DEVICE)
    v8 = torch.ones(8, device=DEVICE)
    wgrad = conv_wgrad.conv2d_weight_grad
    with pytest.raises(TypeError, match="conv2d_weight_grad: x has dtype torch.float64"):
        wgrad(x.double(), dy.double(), (4, 8, 3, 3))
    with pytest.raises(TypeError, match="grad_out has dtype torch.bfloat16, expected x's dtype torch.float32"):
        wgrad(x, dy.bfloat16(), (4, 8, 3, 3))
    with pytest.raises(ValueError, match=r"grad_out must have the conv output's shape \(2, 4, 5, 5\)"):
        wgrad(x, dy, (4, 8, 3, 3), padding=1)
    with pytest.raises(ValueError, match="conv2d_weight_grad: weight of shape .* does not fit x with 8 channels"):
        wgrad(x, dy, (4, 4, 3, 3))
    with pytest.raises(ValueError, match="weight_shape must be 4 non-negative ints"):
        wgrad(x, dy, (4, 8, -3, 3))
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        wgrad(x, dy, (4, 8, 3, 3), stride=0)
    with pytest.raises(ValueError, match="given together"):
        wgrad(x, dy, (4, 8, 3, 3), in_scale=v8)
    with pytest.raises(TypeError, match="conv2d_weight_grad: in_shift must be a float32 tensor"):
        wgrad(x, dy, (4, 8, 3, 3), in_scale=v8, in_shift=v8.half())
    with pytest.raises(ValueError, match=r"in_scale must have shape \(8,\)"):
        wgrad(x, dy, (4, 8, 3, 3), in_scale=v8[:4], in_shift=v8)
    with pytest.raises(RuntimeError, match="conv2d_weight_grad: .* per group"):  # 17 groups of 1: none merge
        wgrad(torch.randn(2, 17, 5, 5, device=DEVICE), torch.randn(2, 17, 3, 3, device=DEVICE), (17, 1, 3, 3),
              groups=17)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedres.triton import conv_wgrad

fn = conv_wgrad._wgrad_kernel.fn
config = conv_wgrad._CONFIGS[0]
# bf16 with one (r, s) per column tile and a ReLU prologue; fp32 (a TF32 dot) with flat columns
for dtype, flags in (("bf16", dict(PROLOGUE=True, IN_RELU=True, FLAT_K=False)),
                     ("fp32", dict(PROLOGUE=True, IN_RELU=False, FLAT_K=True))):
    consts = dict(R=3, S=3, **flags, **config.kwargs)
    sig = {a: "constexpr" if a in consts else f"*{dtype}" if a in ("x_ptr", "dy_ptr") else
           "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile the kernel for real")
def test_kernel_compiles_for_sm90_on_cpu():
    """The interpreter runs code the compiler rejects: compile two variants for an H100 with the wheel's
    ptxas, in a process without TRITON_INTERPRET (so with the GPU configs)."""
    done = compile_for_sm90(_COMPILE_FOR_SM90)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_channels_last_kernel_is_pipelined_on_hopper_tensor_cores():
    """As for the forward conv: on channels_last x and grad_out (the layer1 3x3 conv, bf16, the first config)
    the reduction over rows runs on wgmma, fed by asynchronous copies; the bare kernel loads nothing
    synchronously and keeps one buffer per stage, the prologue variant at least double buffering."""
    strides = LAYER1_3X3_CHANNELS_LAST_STRIDES
    ints = dict(LAYER1_3X3, ROWS_PER_SPLIT=8192, **named_strides("stride_x", strides),
                **named_strides("stride_d", strides))
    off = dict(PROLOGUE=False, IN_RELU=False, FLAT_K=False)
    found = compile_launch_like_for_sm90(
        "fusedres.triton.conv_wgrad", "_wgrad_kernel", {}, ints, dict(R=3, S=3),
        {"bare": off, "prologue": dict(off, PROLOGUE=True, IN_RELU=True)}, ("x_ptr", "dy_ptr"))
    block = found["block"]
    tile_bytes = 2 * block["BLOCK_M"] * (block["BLOCK_N"] + block["BLOCK_K"])  # bf16 BLOCK_M x (BLOCK_N + BLOCK_K)
    assert_pipelined(found, "bare", "prologue", tile_bytes)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_stem_gradient_runs_space_to_depth_on_asynchronous_copies():
    """ResNet-50's stem (3->64 7x7/2, 224 px, batch 256, bf16 channels_last) as conv2d_weight_grad launches it,
    space-to-depth with flat columns: every config's kernel runs wgmma fed by asynchronous copies, loads
    nothing synchronously and spills nothing."""
    x = torch.empty(256, 3, 224, 224, device="meta", dtype=BF16).to(memory_format=torch.channels_last)
    geo = conv._geometry(x, torch.empty(64, 3, 7, 7, device="meta", dtype=BF16), (2, 2), (3, 3), (1, 1), 1)
    geo2 = conv_args._space_to_depth_geometry(geo, conv_args._space_to_depth_channels(geo, 1))
    x2 = torch.empty(256, geo2["H"], geo2["W"], geo2["C"], device="meta", dtype=BF16).permute(0, 3, 1, 2)
    dy_strides = (112 * 112 * 64, 1, 112 * 64, 64)
    ints = dict({k: v for k, v in geo2.items() if k not in ("R", "S")}, ROWS_PER_SPLIT=8192,
                **named_strides("stride_x", x2.stride()), **named_strides("stride_d", dy_strides))
    for block in ({"BLOCK_M": 64, "BLOCK_K": 128}, {"BLOCK_M": 128}):
        found = compile_launch_like_for_sm90(
            "fusedres.triton.conv_wgrad", "_wgrad_kernel", block, ints, dict(R=geo2["R"], S=geo2["S"]),
            {"bare": dict(PROLOGUE=False, IN_RELU=False, FLAT_K=True)}, ("x_ptr", "dy_ptr"))
        bare = found["variants"]["bare"]
        assert bare["wgmma"] > 0 and bare["cp_async"] > 0 and bare["ld_global"] == 0, found
        assert bare["spill_bytes"] == 0, found


# ----------------------------------------------------------------------------- GPU only

RESNET50_CONVS = {  # (C, K, H, kernel, stride, padding, N) of torchvision ResNet-50 convs
    "stem": (3, 64, 224, 7, 2, 3, 4),
    "l1_3x3": (64, 64, 56, 3, 1, 1, 8),
    "l1_reduce": (256, 64, 56, 1, 1, 0, 8),
    "l2_3x3_s2": (128, 128, 56, 3, 2, 1, 8),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", list(RESNET50_CONVS))
def test_gpu_resnet50_shapes_bf16(name):
    c, k, h, kernel, stride, padding, n = RESNET50_CONVS[name]
    case = _case(c, k, h, kernel, stride, padding, BF16, True, True, "none" if name == "stem" else "relu", n=n)
    x, dy, weight_shape, kw = _make(case)
    assert conv_wgrad.unsupported_reason(x, dy, weight_shape, *_geo_args(case)) is None
    dw = conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw)
    _check(dw, x, dy, weight_shape, kw, name)


@pytest.mark.gpu
@requires_cuda
def test_gpu_grouped_resnext_shape_nchw_grad():
    case = _case(256, 256, 28, 3, 2, 1, BF16, True, False, "relu", groups=8, n=4)
    x, dy, weight_shape, kw = _make(case)
    dw = conv_wgrad.conv2d_weight_grad(x, dy, weight_shape, **kw)
    _check(dw, x, dy, weight_shape, kw)
