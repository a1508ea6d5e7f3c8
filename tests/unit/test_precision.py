"""devlayer.train.precision: names, autocast and the fp16 scaler's effect on the step."""

from __future__ import annotations

import pytest
import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train.precision import Precision, resolve_precision
from tests.helpers import toy_trainer

CPU = torch.device("cpu")


def _net_with_grads(amp: Precision) -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    amp.scale(net(torch.ones(2, 4)).sum()).backward()
    return net, opt


def test_names_and_aliases_resolve_and_unknown_names_are_refused():
    assert [resolve_precision(n) for n in ("fp32", "bf16", "fp16")] == [
        "32",
        "bf16-mixed",
        "16-mixed",
    ]
    with pytest.raises(InvalidArgumentError, match=r"'fp8'.*'bf16-mixed'"):
        resolve_precision("fp8")


def test_bf16_autocast_runs_the_forward_in_bf16_and_full_precision_does_not():
    net = torch.nn.Linear(2, 2)
    with Precision("bf16-mixed", CPU).autocast():
        assert net(torch.ones(1, 2)).dtype == torch.bfloat16
    with Precision("32", CPU).autocast():
        assert net(torch.ones(1, 2)).dtype == torch.float32


def test_fp16_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    amp = Precision("16-mixed", CPU)
    net, opt = _net_with_grads(amp)
    before = [p.detach().clone() for p in net.parameters()]
    net.weight.grad[0, 0] = float("inf")
    scale = amp.scaler.get_scale()
    amp.step(opt, net.parameters(), clip_grad=None)
    # The step was skipped:
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    assert amp.scaler.get_scale() == scale / 2  # and the scale backed off
    # Without the scaler the same step would have written inf/NaN into the weights.
    plain = Precision("32", CPU)
    plain_net, plain_opt = _net_with_grads(plain)
    plain_net.weight.grad[0, 0] = float("inf")
    plain.step(plain_opt, plain_net.parameters(), clip_grad=None)
    assert not torch.isfinite(plain_net.weight).all()


def test_fp16_clipping_unscales_first_so_the_clip_applies_to_the_true_gradients():
    amp = Precision("16-mixed", CPU)
    scale = amp.scaler.get_scale()
    net, opt = _net_with_grads(amp)  # gradients scaled by `scale`
    true_norm = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item() / scale
    assert true_norm > 1.0  # so clip_grad=1.0 must bite
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    amp.step(opt, net.parameters(), clip_grad=1.0)
    moved = (torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm()
    assert moved.item() == pytest.approx(1.0, rel=1e-4)  # lr=1: the step's norm is the clip


def test_trainer_under_fp16_skips_every_step_whose_loss_is_inf(clean_env):
    """Inf losses on every step: the weights must not move (the scaler ran and skipped)."""

    def inf_step(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y) * float("inf")

    x = torch.randn(32, 4)
    with devlayer.init(backend="cpu"):
        net = torch.nn.Linear(4, 1)
        before = [p.detach().clone() for p in net.parameters()]
        trainer = toy_trainer(
            net, loss_fn=None, lr=0.1, training_step=inf_step, precision="16-mixed"
        )
        trainer.fit(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)))
    assert trainer.state.global_step == 4
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    assert trainer.scaler.get_scale() == 65536.0 / 2**4  # backed off once per skipped step


def test_checkpoint_state_round_trips_the_scale():
    amp = Precision("16-mixed", CPU)
    net, opt = _net_with_grads(amp)
    amp.step(opt, net.parameters(), clip_grad=None)
    amp.scaler.update(new_scale=128.0)
    other = Precision("fp16", CPU)
    other.load_state_dict(amp.state_dict())
    assert other.scaler.get_scale() == 128.0
    assert Precision("32", CPU).state_dict() is None


def test_sharded_scaler_skips_backs_off_grows_and_round_trips():
    """World size 1 (the all-reduce is a no-op): the scaler's own rules."""
    from devlayer.train.precision import ShardedGradScaler
    from devlayer.train.strategy import FSDPStrategy

    with devlayer.init(backend="cpu"):
        amp = FSDPStrategy().precision("16-mixed", CPU)
        assert isinstance(amp.scaler, ShardedGradScaler) and amp.dtype is None  # FSDP casts
        net, opt = _net_with_grads(amp)
        before = [p.detach().clone() for p in net.parameters()]
        net.weight.grad[0, 0] = float("nan")
        amp.step(opt, net.parameters(), clip_grad=None)
        assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
        assert amp.scaler.get_scale() == 2.0**15
        net, opt = _net_with_grads(amp)
        grads = [p.grad.clone() / 2.0**15 for p in net.parameters()]
        amp.step(opt, net.parameters(), clip_grad=None)  # finite: unscaled, then stepped
        assert all(torch.allclose(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
    scaler = ShardedGradScaler(init_scale=4.0, growth_interval=2)
    scaler.update(True)
    scaler.update(True)
    assert scaler.get_scale() == 8.0
    other = ShardedGradScaler()
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == {"scale": 8.0, "growth_tracker": 0}
