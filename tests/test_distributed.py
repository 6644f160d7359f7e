"""Synchronised BatchNorm and DistributedDataParallel: two real processes on CPU (gloo).

Each test spawns two ranks on loopback; every rank checks its own results and reports back
through a queue, and the test fails if a rank fails, dies or runs past the time limit.

The oracle for synchronised BatchNorm is what ``nn.SyncBatchNorm`` specifies: BatchNorm over
the union of all ranks' batches, i.e. the plain torch computation on the concatenated batch in
one process. Torch's own SyncBatchNorm cannot serve on CPU (torch 2.14): its synchronised path
raises "SyncBatchNorm expected input tensor to be on GPU", its kernels being CUDA-only, and DDP
refuses a CPU module holding one. Without synchronisation, converted models are compared with
the unconverted one under DDP in the same run.
"""

import copy
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import timm
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fusedres
from fusedres.nn import FusedBasicBlock
from fusedres.nn.preact import FusedPreActBasic
from fusedres.ops import functional

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")

WORLD_SIZE = 2
TIMEOUT_S = 150  # the whole two-process run, start-up included
F64 = torch.float64
EPS = 1e-5
MOMENTUM = 0.1


# --------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, results) -> None:
    error = None
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                                timeout=timedelta(seconds=60))
        torch.set_num_threads(1)
        SCENARIOS[scenario](rank)
    except BaseException:
        error = traceback.format_exc()
    finally:
        results.put((rank, error))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_two_ranks(scenario: str) -> None:
    """Run ``SCENARIOS[scenario](rank)`` on two spawned ranks; fail with their tracebacks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, scenario, results), daemon=True)
             for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(reports) < WORLD_SIZE and time.monotonic() < deadline:
            try:
                rank, error = results.get(timeout=0.5)
                reports[rank] = error
            except queue.Empty:
                if all(p.exitcode is not None for p in procs) and results.empty():
                    break  # every rank is gone; whoever has not reported died
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    problems = []
    for rank, p in enumerate(procs):
        if rank not in reports:
            problems.append(f"rank {rank}: no report (exit code {p.exitcode}; "
                            f"timed out after {TIMEOUT_S} s or died)")
        elif reports[rank] is not None:
            problems.append(f"rank {rank} failed:\n{reports[rank]}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- helpers
BATCH_SIZES = (2, 3)  # per rank: SyncBatchNorm must weigh unequal batches by their size


def rank_slice(rank: int, sizes=BATCH_SIZES) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def assert_close(actual, expected, what, tol=1e-10):
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


class BNState:
    """A BatchNorm's affine parameters and running statistics, as plain tensors."""

    def __init__(self, gen: torch.Generator, channels: int):
        self.weight = leaf(torch.rand(channels, generator=gen, dtype=F64) + 0.5)
        self.bias = leaf(torch.rand(channels, generator=gen, dtype=F64) - 0.5)
        self.running_mean = torch.randn(channels, generator=gen, dtype=F64) * 0.3
        self.running_var = torch.rand(channels, generator=gen, dtype=F64) + 0.5

    def copy(self) -> "BNState":
        new = copy.copy(self)
        new.weight, new.bias = leaf(self.weight), leaf(self.bias)
        new.running_mean, new.running_var = self.running_mean.clone(), self.running_var.clone()
        return new

    def fused_stats(self, y, process_group) -> functional.PendingBN:
        return functional.batch_norm_stats(
            y, self.weight, self.bias, self.running_mean, self.running_var, batch_stats=True,
            momentum=MOMENTUM, eps=EPS, process_group=process_group)

    def torch_bn(self, y):
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                            True, MOMENTUM, EPS)

    def check_against(self, ref: "BNState", what: str) -> None:
        """Gradients are each rank's share (DDP adds them up); running stats are global."""
        assert_close(summed_over_ranks(self.weight.grad), ref.weight.grad, f"{what} weight grad")
        assert_close(summed_over_ranks(self.bias.grad), ref.bias.grad, f"{what} bias grad")
        assert_close(self.running_mean, ref.running_mean, f"{what} running_mean")
        assert_close(self.running_var, ref.running_var, f"{what} running_var")


# --------------------------------------------------------------------------- (a) functional ops
def functional_bn_act(rank: int) -> None:
    """batch_norm_stats(process_group) -> bn_act with a BatchNorm shortcut, against F.batch_norm
    of the concatenated batch; also a rank with an empty batch."""
    for sizes in (BATCH_SIZES, (0, 3)):
        gen = torch.Generator().manual_seed(1)
        total = sum(sizes)
        y_full, sc_full = (torch.randn(total, 4, 3, 5, generator=gen, dtype=F64) * 2 + 1
                           for _ in range(2))
        grad_full = torch.randn(total, 4, 3, 5, generator=gen, dtype=F64)
        bn, sc_bn = BNState(gen, 4), BNState(gen, 4)
        ref_bn, ref_sc_bn = bn.copy(), sc_bn.copy()

        mine = rank_slice(rank, sizes)
        y, sc_y = leaf(y_full[mine]), leaf(sc_full[mine])
        out = functional.bn_act(bn.fused_stats(y, dist.group.WORLD),
                                sc_bn.fused_stats(sc_y, dist.group.WORLD))
        out.backward(grad_full[mine])

        y_ref, sc_ref = leaf(y_full), leaf(sc_full)
        out_ref = torch.relu(ref_bn.torch_bn(y_ref) + ref_sc_bn.torch_bn(sc_ref))
        out_ref.backward(grad_full)

        what = f"batch sizes {sizes}"
        assert_close(out, out_ref[mine], f"{what}: output")
        assert_close(y.grad, y_ref.grad[mine], f"{what}: input grad")
        assert_close(sc_y.grad, sc_ref.grad[mine], f"{what}: shortcut input grad")
        bn.check_against(ref_bn, f"{what}: bn")
        sc_bn.check_against(ref_sc_bn, f"{what}: shortcut bn")

    # One value per channel on a rank is fine when the group holds more, as for torch's
    # SyncBatchNorm; one in the whole group is not.
    y = torch.full((1, 4, 1, 1), float(rank), dtype=F64)
    p = functional.batch_norm_stats(y, None, None, None, None, batch_stats=True,
                                    momentum=MOMENTUM, eps=EPS, process_group=dist.group.WORLD)
    assert_close(p.invstd, torch.full((4,), (0.25 + EPS) ** -0.5, dtype=F64), "invstd of 0 and 1")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        functional.batch_norm_stats(y[:1 - rank], None, None, None, None, batch_stats=True,
                                    momentum=MOMENTUM, eps=EPS, process_group=dist.group.WORLD)


def functional_bn_act_conv2d(rank: int) -> None:
    """batch_norm_stats(process_group) -> bn_act_conv2d over a process group other than WORLD
    (one made with new_group), against conv2d(relu(F.batch_norm(...))) of the whole batch."""
    group = dist.new_group(list(range(WORLD_SIZE)))
    assert group.group_name != dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(2)
    y_full = torch.randn(sum(BATCH_SIZES), 3, 5, 4, generator=gen, dtype=F64) - 2
    bn = BNState(gen, 3)
    conv_weight = leaf(torch.randn(6, 3, 3, 3, generator=gen, dtype=F64))
    conv_bias = leaf(torch.randn(6, generator=gen, dtype=F64))
    ref_bn = bn.copy()
    ref_conv_weight, ref_conv_bias = leaf(conv_weight), leaf(conv_bias)
    grad_full = torch.randn(sum(BATCH_SIZES), 6, 5, 2, generator=gen, dtype=F64)

    mine = rank_slice(rank)
    y = leaf(y_full[mine])
    out = functional.bn_act_conv2d(bn.fused_stats(y, group), conv_weight, conv_bias, stride=(1, 2),
                                   padding=1)
    out.backward(grad_full[mine])

    y_ref = leaf(y_full)
    out_ref = F.conv2d(torch.relu(ref_bn.torch_bn(y_ref)), ref_conv_weight, ref_conv_bias,
                       stride=(1, 2), padding=1)
    out_ref.backward(grad_full)

    assert_close(out, out_ref[mine], "output")
    assert_close(y.grad, y_ref.grad[mine], "input grad")
    bn.check_against(ref_bn, "bn")
    assert_close(summed_over_ranks(conv_weight.grad), ref_conv_weight.grad, "conv weight grad")
    assert_close(summed_over_ranks(conv_bias.grad), ref_conv_bias.grad, "conv bias grad")


# --------------------------------------------------------------------------- (b), (c) models
def resnet18() -> nn.Module:
    """The same fp64 torchvision ResNet-18 on every call, non-trivial BN parameters and stats."""
    torch.manual_seed(0)
    return with_random_batch_norms(torchvision.models.resnet18(num_classes=10).double())


def resnetv2_18() -> nn.Module:
    """The same fp64 timm pre-activation resnetv2_18 on every call, BN state as resnet18()'s."""
    torch.manual_seed(0)
    return with_random_batch_norms(timm.create_model("resnetv2_18", num_classes=10).double())


def with_random_batch_norms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def global_batch(sizes=BATCH_SIZES, image_size=32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(sizes), 3, image_size, image_size, generator=gen, dtype=F64)
    return x, torch.randint(0, 10, (sum(sizes),), generator=gen)


STEPS = 2


def train(model, inputs, loss_fn) -> list[torch.Tensor]:
    """SGD steps (momentum 0.9) on ``loss_fn(model(x), target)``; the losses."""
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        x, target = inputs
        loss = loss_fn(model(x), target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.detach())
    return losses


def assert_same_model(model, ref, what, tol):
    for (name, value), (_, expected) in zip(model.state_dict().items(), ref.state_dict().items()):
        if expected.dtype == torch.long:
            assert torch.equal(value, expected), f"{what}: {name} {value} != {expected}"
        else:
            assert_close(value, expected, f"{what}: {name}", tol)


def train_on_whole_batch(ref: nn.Module, x, target, rank: int) -> list[torch.Tensor]:
    """Train ``ref`` on the whole batch with the mean of the ranks' losses (what DDP's gradient
    averaging optimises); the losses of this rank's shard."""
    ref_losses = []

    def mean_of_rank_losses(out, t):
        losses = [F.cross_entropy(out[rank_slice(r)], t[rank_slice(r)]) for r in range(WORLD_SIZE)]
        ref_losses.append(losses[rank].detach())
        return sum(losses) / WORLD_SIZE

    train(ref, (x, target), mean_of_rank_losses)
    return ref_losses


def freeze_stem_and_one_shortcut(model: nn.Module) -> nn.Module:
    model.bn1.eval()
    model.layer2[0].downsample[1].eval()
    return model


def ddp_sync_batchnorm(rank: int) -> None:
    """ResNet-18 with SyncBatchNorm, fused (convert_sync_batchnorm before or after
    fusedres.convert), under DDP on each rank's shard == the unconverted model with plain
    BatchNorm on the whole batch, whose loss is the mean of the ranks' losses (what DDP's
    gradient averaging optimises)."""
    x, target = global_batch()
    mine = rank_slice(rank)
    # The stem's BatchNorm is no block's: a SyncBatchNorm there is torch's own, which cannot
    # synchronise on CPU. Frozen (eval mode, as in fine-tuning) it needs no synchronisation.
    # And one shortcut BatchNorm frozen: that block applies it in a pass of its own.
    ref = freeze_stem_and_one_shortcut(resnet18())
    ref_losses = train_on_whole_batch(ref, x, target, rank)

    for order in ("sync-then-convert", "convert-then-sync"):
        model = resnet18()
        if order == "sync-then-convert":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            report = fusedres.convert(model)
        else:
            report = fusedres.convert(model)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        freeze_stem_and_one_shortcut(model)
        blocks = [name for name, what in report.converted if "Block" in what]
        assert len(blocks) == 8, f"{order}: {report}"
        # The stem's BN+ReLU is fused only if it was still a plain BatchNorm2d; after
        # convert_sync_batchnorm it is torch's SyncBatchNorm again, its ReLU placeholder a ReLU.
        assert report.skipped == ([("bn1", "SyncBatchNorm outside residual blocks is not fused")]
                                  if order == "sync-then-convert" else []), f"{order}: {report}"
        norms = [m for b in model.modules() if isinstance(b, FusedBasicBlock)
                 for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 19 and all(type(m) is nn.SyncBatchNorm for m in norms), order
        assert list(model.state_dict()) == list(ref.state_dict()), order
        # DDP refuses SyncBatchNorm in a CPU module ("SyncBatchNorm layers only work with GPU
        # modules"), torch's own being GPU-only; the fused blocks' is not, so lift that check.
        with mock.patch.object(DDP, "_passing_sync_batchnorm_handle", lambda self, module: None):
            ddp_model = DDP(model)
        losses = train(ddp_model, (x[mine], target[mine]), F.cross_entropy)
        assert_close(torch.stack(losses), torch.stack(ref_losses), f"{order}: losses", 1e-9)
        assert_same_model(model, ref, order, 1e-9)


def ddp_plain_batchnorm(rank: int) -> None:
    """A converted ResNet-18 (plain BatchNorm: each rank normalises its own shard) under DDP
    == the unconverted one under DDP, in the same two-process run."""
    x, target = global_batch(image_size=64)
    mine = rank_slice(rank)
    ref, model = resnet18(), resnet18()
    assert len(fusedres.convert(model).converted) == 10  # 8 blocks, the stem's BN + ReLU, its fold
    for m in (ref, model):  # a frozen shortcut BatchNorm: that block applies it on its own
        m.layer3[0].downsample[1].eval()
    ref_losses = train(DDP(ref), (x[mine], target[mine]), F.cross_entropy)
    losses = train(DDP(model), (x[mine], target[mine]), F.cross_entropy)
    assert_close(torch.stack(losses), torch.stack(ref_losses), "losses", 1e-9)
    assert_same_model(model, ref, "model", 1e-9)


def ddp_sync_preact(rank: int) -> None:
    """A converted pre-activation resnetv2_18 after timm's convert_sync_batchnorm (every block
    norm a SyncBatchNormAct), under DDP on each rank's shard == the unconverted model with plain
    BatchNorm on the whole batch. The final norm stands outside the blocks: timm's
    SyncBatchNormAct there is torch's SyncBatchNorm, which cannot synchronise on CPU, so it is
    frozen (eval mode) in both."""
    x, target = global_batch()
    mine = rank_slice(rank)
    ref = resnetv2_18()
    ref.norm.eval()
    ref_losses = train_on_whole_batch(ref, x, target, rank)
    model = resnetv2_18()
    assert len(fusedres.convert(model).converted) == 9  # 8 blocks and the final norm
    model = timm.layers.convert_sync_batchnorm(model)
    model.norm.eval()
    norms = [m for b in model.modules() if isinstance(b, FusedPreActBasic) for m in b.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 16 and all(type(m) is timm.layers.SyncBatchNormAct for m in norms)
    with mock.patch.object(DDP, "_passing_sync_batchnorm_handle", lambda self, module: None):
        ddp_model = DDP(model)
    losses = train(ddp_model, (x[mine], target[mine]), F.cross_entropy)
    assert_close(torch.stack(losses), torch.stack(ref_losses), "losses", 1e-9)
    assert_same_model(model, ref, "resnetv2_18", 1e-9)


def sync_batchnorm_with_an_empty_rank(rank: int) -> None:
    """A converted ResNet-18 with SyncBatchNorm everywhere (the stem's run by the stem unit), one training forward
    and backward on batches of 3 and 0 images: the empty rank runs the fused blocks and stem too, taking part in
    their all-gathers and all-reduces with a count of 0 (it ran torch's SyncBatchNorm, whose exchanges differ
    from ours: a mix that hangs or misreads). Against plain BatchNorm on the whole batch: the output, the input
    gradient, the parameter gradients summed over the ranks and the running statistics."""
    sizes = (3, 0)
    x, _ = global_batch(sizes)
    grad = torch.randn(sum(sizes), 10, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref, x_ref = resnet18().train(), leaf(x)
    out_ref = ref(x_ref)
    out_ref.backward(grad)
    model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(resnet18())).model.train()
    mine = rank_slice(rank, sizes)
    x_mine = leaf(x[mine])
    out = model(x_mine)
    out.backward(grad[mine])
    what = f"rank {rank} of batch sizes {sizes}"
    assert_close(out, out_ref[mine], f"{what}: output")
    assert_close(x_mine.grad, x_ref.grad[mine], f"{what}: input grad")
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert_close(summed_over_ranks(p.grad), p_ref.grad, f"{what}: {name} grad")
    assert_same_model(model, ref, what, 1e-10)


def functional_ops(rank: int) -> None:
    functional_bn_act(rank)
    functional_bn_act_conv2d(rank)


SCENARIOS = {f.__name__: f for f in (functional_ops, ddp_sync_batchnorm, ddp_plain_batchnorm,
                                     ddp_sync_preact, sync_batchnorm_with_an_empty_rank)}


# --------------------------------------------------------------------------- tests
def test_synchronised_functional_ops_match_the_whole_batch():
    run_on_two_ranks("functional_ops")


def test_sync_batchnorm_resnet_under_ddp_matches_whole_batch_training():
    run_on_two_ranks("ddp_sync_batchnorm")


def test_converted_resnet_under_ddp_matches_unconverted():
    run_on_two_ranks("ddp_plain_batchnorm")


def test_converted_preact_resnet_with_timm_sync_batchnorm_matches_whole_batch_training():
    run_on_two_ranks("ddp_sync_preact")


def test_sync_batchnorm_with_an_empty_rank_matches_whole_batch_training():
    run_on_two_ranks("sync_batchnorm_with_an_empty_rank")
