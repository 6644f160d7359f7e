"""Model-level helpers shared by the conversion tests: the same SGD steps on an eager and a
fused copy, compared in losses, every gradient, the state_dict and the eval output."""

import copy

import torch
from torch import nn


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running stats, so nothing hides behind 1s and 0s."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def training_record(model, x, target, steps, lr=0.05) -> dict[str, torch.Tensor]:
    """Losses, last step's gradients, final state_dict and eval output after SGD steps."""
    torch.manual_seed(0)  # the same random draws (e.g. drop-path) for every model compared
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    record, losses = {}, []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.detach())
        record.update({f"grad of {n}": p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None})
        optim.step()
    record["losses"] = torch.stack(losses)
    record.update(model.state_dict())
    with torch.no_grad():
        record["eval output"] = model.eval()(x)
    return record


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||: whole-tensor error, robust to tiny elements."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_same_training(eager, fused, x, target, steps, tol):
    """Same losses, gradients, buffers and eval outputs, within ``tol`` relative error."""
    expected = training_record(eager, x, target, steps)
    actual = training_record(fused, x, target, steps)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert rel_error(actual[name], value) <= tol, f"{name}: {rel_error(actual[name], value):.3g}"


def grouped(record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All gradients as one vector, all buffers/parameters as one, losses, eval output."""
    groups = {"gradients": [], "state": []}
    for name, value in record.items():
        if name.startswith("grad of "):
            groups["gradients"].append(value.double().flatten())
        elif name not in ("losses", "eval output"):
            groups["state"].append(value.double().flatten())
    grouped = {k: torch.cat(v) for k, v in groups.items()}
    return {**grouped, "losses": record["losses"], "eval output": record["eval output"]}


def assert_no_worse_than_eager(eager, fused, x, target, steps):
    """Low precision: fused's error against an fp64 run at most 2x eager's own, plus 1e-5.

    Compared over all gradients together (and all buffers together): per tensor, the errors of
    a randomly initialised fp32 ResNet are noisy (eager itself is ~1% off fp64 on some). A small
    learning rate keeps those gradient errors from dominating the weights after the step.
    """
    exact = grouped(training_record(copy.deepcopy(eager).double(), x.double(), target, steps, lr=1e-3))
    eager_record = grouped(training_record(eager, x, target, steps, lr=1e-3))
    fused_record = grouped(training_record(fused, x, target, steps, lr=1e-3))
    for name, value in exact.items():
        eager_error = rel_error(eager_record[name], value)
        fused_error = rel_error(fused_record[name], value)
        assert fused_error <= 2 * eager_error + 1e-5, f"{name}: {fused_error:.3g} vs eager {eager_error:.3g}"


def assert_converted_trains_like_eager(eager, seed, expected_converted, dtype, channels_last, steps):
    """Convert a copy of ``eager`` (its BN state randomised): every module converted
    (``expected_converted`` of them), none left, identical state_dict keys, and the same SGD steps
    as eager on 3 images of 64x64: fp64 within 1e-10, lower precision within 2x eager's own error."""
    import fusedres

    randomise_bn(eager, seed=seed)
    fused = copy.deepcopy(eager)
    report = fusedres.convert(fused)
    assert len(report.converted) == expected_converted and report.skipped == [], str(report)
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(3, 3, 64, 64, dtype=dtype)
    if channels_last:
        eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager, fused))
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (3,))
    if dtype == torch.float64:
        assert_same_training(eager, fused, x, target, steps, tol=1e-10)
    else:
        assert_no_worse_than_eager(eager, fused, x, target, steps)
