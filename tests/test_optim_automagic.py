"""The Automagic optimizer (aitk.optim.automagic) and its wiring through the factory and trainer."""

from __future__ import annotations

import copy
import io
import logging
import math
from pathlib import Path

import pytest
import torch

from aitk.optim import OptimizerConfigError, build_optimizer
from aitk.optim.automagic import Automagic, stochastic_round_to_bf16


def _step(opt: Automagic, grads: dict[torch.Tensor, list | torch.Tensor]) -> None:
    for p, g in grads.items():
        p.grad = torch.as_tensor(g, dtype=torch.float32).to(p.dtype).reshape(p.shape)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ the update

def test_mask_rises_on_repeat_falls_on_flip_and_clamps():
    p = torch.nn.Parameter(torch.zeros(4))
    # grid: 1.0 + k * 0.25 clamped to [0.5, 1.2]
    opt = Automagic([p], lr=1.0, min_lr=0.5, max_lr=1.2, lr_bump=0.25)
    _step(opt, {p: [1.0, -1.0, 1.0, 0.0]})  # first step: nothing to compare
    assert torch.equal(opt.learning_rate_mask(p), torch.ones(4))
    assert opt.last_gradient_stability is None
    _step(opt, {p: [2.0, 1.0, -3.0, 1.0]})  # repeat, flip, flip, no previous sign
    assert opt.learning_rate_mask(p).tolist() == pytest.approx([1.2, 0.75, 0.75, 1.0])
    _step(opt, {p: [1.0, 1.0, -1.0, 1.0]})  # all repeat
    assert opt.learning_rate_mask(p).tolist() == pytest.approx([1.2, 1.0, 1.0, 1.2])
    for g in ([-1.0] * 4, [1.0] * 4, [-1.0] * 4, [1.0] * 4):  # flip every step: down to min_lr
        _step(opt, {p: g})
    assert opt.learning_rate_mask(p).tolist() == pytest.approx([0.5] * 4)
    assert opt.state[p]["lr_code"].dtype == torch.int16 and opt.state[p]["sign"].dtype == torch.int8


def test_update_is_grad_over_rms_with_clipping_and_decay():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    opt = Automagic([p], lr=0.1, min_lr=0.01, max_lr=1.0, lr_bump=0.01)
    _step(opt, {p: [0.5, -2.0, 3.0, 0.0]})
    # bias-corrected v = g² at step 1, so the update is sign(g); RMS = sqrt(3/4) < 1: no clipping
    assert p.tolist() == pytest.approx([0.9, 2.1, 2.9, 4.0])

    q = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    clip = Automagic([q], lr=0.1, min_lr=0.01, max_lr=1.0, lr_bump=0.01, clip_threshold=0.5)
    _step(clip, {q: [0.5, -2.0, 3.0, 0.0]})
    scale = math.sqrt(0.75) / 0.5  # RMS / threshold
    assert q.tolist() == pytest.approx([1 - 0.1 / scale, 2 + 0.1 / scale, 3 - 0.1 / scale, 4.0])

    r = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    decay = Automagic([r], lr=0.1, min_lr=0.01, max_lr=1.0, lr_bump=0.01, weight_decay=0.5)
    _step(decay, {r: [1.0, -1.0]})
    # decoupled decay with the element's rate: p - lr * (update + wd * p)
    assert r.tolist() == pytest.approx([1 - 0.1 * (1 + 0.5), 2 - 0.1 * (-1 + 1.0)])


def test_second_moment_second_step_uses_the_ema():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = Automagic([p], lr=0.1, min_lr=0.1, max_lr=0.1, lr_bump=0.0, beta2=0.5)
    _step(opt, {p: [1.0, 2.0]})
    _step(opt, {p: [3.0, 2.0]})
    # raw EMA after two steps: 0.5 * (0.5 * g1²) + 0.5 * g2², bias-corrected by 1 - 0.5²
    v = torch.tensor([0.25 * 1 + 0.5 * 9, 0.25 * 4 + 0.5 * 4]) / (1 - 0.5**2)
    u = torch.tensor([3.0, 2.0]) / v.sqrt()
    u = u / max(1.0, u.square().mean().sqrt().item())
    expected = -0.1 * torch.tensor([1.0, 1.0]) - 0.1 * u
    assert p.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_factored_second_moment_for_matrices_and_conv_full_for_vectors():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(8, 4), torch.nn.Conv2d(3, 6, 3)
    params = [*lin.parameters(), *conv.parameters()]
    opt = Automagic(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state
    assert st[lin.weight]["exp_avg_sq_row"].shape == (4,) and st[lin.weight]["exp_avg_sq_col"].shape == (8,)
    assert st[conv.weight]["exp_avg_sq_row"].shape == (6,) and st[conv.weight]["exp_avg_sq_col"].shape == (27,)
    assert "exp_avg_sq_row" not in st[lin.bias] and st[lin.bias]["exp_avg_sq"].shape == (4,)
    assert st[conv.bias]["exp_avg_sq"].shape == (6,)


def test_factored_update_matches_outer_product_over_mean():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(3, 5))
    opt = Automagic([w], lr=0.1, min_lr=0.1, max_lr=0.1, lr_bump=0.0, clip_threshold=100.0)
    g = torch.randn(3, 5)
    _step(opt, {w: g})
    sq = g.square()
    row, col = sq.mean(dim=1), sq.mean(dim=0)
    v = torch.outer(row, col) / row.mean()
    assert torch.allclose(w, -0.1 * g / v.sqrt(), rtol=1e-5)
    # a rank-one gradient is reconstructed exactly: the update is its sign
    w2 = torch.nn.Parameter(torch.zeros(3, 5))
    opt2 = Automagic([w2], lr=0.1, min_lr=0.1, max_lr=0.1, lr_bump=0.0)
    g2 = torch.outer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0, 0.2, 2.0]))
    _step(opt2, {w2: g2})
    assert torch.allclose(w2, -0.1 * g2.sign(), rtol=1e-5)


def test_gradient_stability_is_the_element_weighted_sign_agreement():
    torch.manual_seed(2)
    w, b, idle = (torch.nn.Parameter(torch.zeros(s)) for s in ((6, 7), (7,), (5,)))
    opt = Automagic([w, b, idle], lr=1e-3)
    g1 = {w: torch.randn(6, 7), b: torch.randn(7), idle: torch.randn(5)}
    g1[b][2] = 0.0  # no sign on step 1: not compared on step 2
    _step(opt, g1)
    assert opt.last_gradient_stability is None
    g2 = {w: torch.randn(6, 7), b: torch.randn(7)}  # idle has no gradient: not counted
    g2[w][0, 0] = 0.0
    _step(opt, g2)
    agree = compared = 0
    for p in (w, b):
        both = (g1[p] != 0) & (g2[p] != 0)
        agree += int((both & (g1[p].sign() == g2[p].sign())).sum())
        compared += int(both.sum())
    assert compared == 42 + 7 - 2
    assert opt.last_gradient_stability == pytest.approx(agree / compared)
    assert 0.0 < opt.last_gradient_stability < 1.0


def test_mean_learning_rates_and_scheduler_factor():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = Automagic([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=1.0, min_lr=0.1, max_lr=2.0, lr_bump=0.25)
    assert opt.mean_learning_rates() == pytest.approx([0.5, 1.0])  # not stepped yet: starting rates
    _step(opt, {a: [1.0, 1.0], b: [1.0, 1.0, 1.0]})
    _step(opt, {a: [1.0, -1.0], b: [1.0, 1.0, -1.0]})
    assert opt.mean_learning_rates() == pytest.approx([0.5, (1.25 + 1.25 + 0.75) / 3])
    # a scheduler halving group lr halves the applied step and the reported rate; the mask stays
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.5]
    assert opt.mean_learning_rates() == pytest.approx([0.25, (1.25 + 1.25 + 0.75) / 6])
    before = a.detach().clone()
    _step(opt, {a: [1.0, 1.0]})  # mask [0.75, 0.25] -> repeat 1.0, flip 0.0 clamped to min_lr 0.1
    assert opt.learning_rate_mask(a).tolist() == pytest.approx([1.0, 0.1])
    # every gradient was +-1, so v = 1 and the update is +-1: the step is mask x factor 0.5
    assert (before - a.detach()).tolist() == pytest.approx([0.5, 0.05])
    assert sched.get_last_lr() == [0.25, 0.5]


# ------------------------------------------------------------------------------ groups / factory

def _grid_ends(opt: Automagic, p: torch.nn.Parameter, grads: list[float]) -> float:
    for g in grads:
        _step(opt, {p: [g]})
    return float(opt.learning_rate_mask(p)[0])


def test_per_group_bounds():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = Automagic(
        [{"params": [a]}, {"params": [b], "min_lr": 2e-4, "max_lr": 2e-3, "lr_bump": 5e-4}],
        lr=1e-3, min_lr=1e-4, max_lr=1.5e-3, lr_bump=1e-4,
    )
    up = [1.0] * 12
    for g in up:
        _step(opt, {a: [g], b: [g]})
    assert float(opt.learning_rate_mask(a)[0]) == pytest.approx(1.5e-3)
    assert float(opt.learning_rate_mask(b)[0]) == pytest.approx(2e-3)
    for i in range(30):
        g = [1.0 if i % 2 else -1.0]
        _step(opt, {a: g, b: g})
    assert float(opt.learning_rate_mask(a)[0]) == pytest.approx(1e-4)
    assert float(opt.learning_rate_mask(b)[0]) == pytest.approx(2e-4)


def _expert_groups() -> tuple[list[dict], torch.nn.Parameter, torch.nn.Parameter]:
    hi, lo = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    return [{"params": [hi], "expert": "high_noise"}, {"params": [lo], "expert": "low_noise"}], hi, lo


def _bounds(opt: torch.optim.Optimizer) -> list[tuple[float, float, float]]:
    return [(g["min_lr"], g["max_lr"], g["lr_bump"]) for g in opt.param_groups]


def test_each_per_expert_key_applies_on_its_own():
    groups, _, _ = _expert_groups()
    opt = build_optimizer("automagic", groups, lr=1e-4, optimizer_params={"high_noise_max_lr": 2e-3})
    assert _bounds(opt) == [(1e-7, 2e-3, 1e-6), (1e-7, 1e-3, 1e-6)]

    groups, _, _ = _expert_groups()
    opt = build_optimizer(
        "automagic", groups, lr=1e-4,
        optimizer_params={"max_lr": 5e-3, "lr_bump": 2e-6, "low_noise_min_lr": "1e-5",
                          "high_noise_lr_bump": 3e-6, "high_noise_lr": 2e-4},
    )
    assert _bounds(opt) == [(1e-7, 5e-3, 3e-6), (1e-5, 5e-3, 2e-6)]
    # high_noise_lr is the trainer's business (expert_learning_rate); the factory leaves lr alone
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4]


def test_per_expert_bounds_are_used_by_the_mask():
    groups, hi, lo = _expert_groups()
    opt = build_optimizer(
        "automagic", groups, lr=5e-4,
        optimizer_params={"high_noise_max_lr": 5.02e-4, "low_noise_lr_bump": 1e-4},
    )
    for _ in range(5):  # 4 repeated signs
        _step(opt, {hi: [1.0] * 3, lo: [1.0] * 3})
    assert opt.learning_rate_mask(hi).tolist() == pytest.approx([5.02e-4] * 3)  # 2 bumps of 1e-6, capped
    assert opt.learning_rate_mask(lo).tolist() == pytest.approx([9e-4] * 3)  # 4 bumps of 1e-4


def test_per_expert_key_errors_and_warnings(caplog):
    groups, _, _ = _expert_groups()
    with pytest.raises(OptimizerConfigError, match=r"train\.optimizer_params\.low_noise_max_lr"):
        build_optimizer("automagic", groups, lr=1e-4, optimizer_params={"low_noise_max_lr": "fast"})
    groups, _, _ = _expert_groups()
    with pytest.raises(OptimizerConfigError, match="max_lr"):
        build_optimizer("automagic", groups, lr=1e-4, optimizer_params={"high_noise_max_lr": 1e-8})
    lin = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="aitk.optim.factory"):
        build_optimizer("automagic", [{"params": list(lin.parameters())}], lr=1e-4,
                        optimizer_params={"high_noise_min_lr": 1e-6})
        assert "only apply to multi-expert models" in caplog.text
        caplog.clear()
        build_optimizer("adamw", [{"params": list(lin.parameters())}], lr=1e-4,
                        optimizer_params={"high_noise_min_lr": 1e-6})
        assert "only applies to the automagic optimizer" in caplog.text


def test_factory_builds_automagic_with_coerced_params():
    lin = torch.nn.Linear(4, 4)
    opt = build_optimizer("automagic", [{"params": list(lin.parameters())}], lr=1e-3,
                          optimizer_params={"min_lr": "1e-5", "weight_decay": "0.01", "beta2": 0.99})
    assert isinstance(opt, Automagic)
    g = opt.param_groups[0]
    assert (g["min_lr"], g["weight_decay"], g["beta2"], g["max_lr"]) == (1e-5, 0.01, 0.99, 1e-3)
    with pytest.raises(OptimizerConfigError, match=r"optimizer_params\.min_lrr.*min_lr"):
        build_optimizer("automagic", [{"params": list(lin.parameters())}], lr=1e-3,
                        optimizer_params={"min_lrr": 1e-5})


# ------------------------------------------------------------------------------ bf16

def test_bf16_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bf16, 1 + 2^-7
    gen = torch.Generator().manual_seed(0)
    r = stochastic_round_to_bf16(x, gen)
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    # the mean's standard error is 5.8e-6; nearest rounding would be off by 9.8e-4
    assert r.double().mean().item() == pytest.approx(1.0 + 2.0**-10, abs=3e-5)
    neg = stochastic_round_to_bf16(-x, torch.Generator().manual_seed(1))
    assert neg.double().mean().item() == pytest.approx(-(1.0 + 2.0**-10), abs=3e-5)
    assert x.to(torch.bfloat16).double().mean().item() == 1.0  # nearest rounding would lose it all


def test_bf16_parameter_moves_by_the_expected_amount_reproducibly():
    def run() -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16))
        opt = Automagic([p], lr=1e-3, min_lr=1e-3, max_lr=1e-3, lr_bump=0.0, seed=3)
        _step(opt, {p: torch.ones(50_000)})  # update = 1 per element; bf16 spacing below 1 is 2^-8
        return p.detach().clone()

    a, b = run(), run()
    assert torch.equal(a, b)
    assert a.double().mean().item() == pytest.approx(1.0 - 1e-3, abs=3e-5)
    assert torch.ones(1, dtype=torch.bfloat16).sub(1e-3).item() == 1.0  # why rounding matters


# ------------------------------------------------------------------------------ state

class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.lin = torch.nn.Linear(3 * 4 * 4, 2)
        self.extra = torch.nn.Parameter(torch.randn(2, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).flatten(1)) * self.extra.float()


def _make(seed: int = 0) -> tuple[_Net, Automagic, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    net = _Net()
    opt = Automagic(
        [{"params": [*net.conv.parameters(), net.extra]}, {"params": list(net.lin.parameters()), "max_lr": 5e-3}],
        lr=1e-3, min_lr=1e-4, max_lr=1e-2, lr_bump=1e-4, weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return net, opt, sched


def _train(net: _Net, opt: Automagic, sched, steps: range) -> list[float]:
    out = []
    for s in steps:
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, generator=g)
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        out.append(opt.last_gradient_stability)
    return out


def test_state_dict_round_trip_continues_bit_for_bit():
    net, opt, sched = _make()
    straight = _train(net, opt, sched, range(12))

    net2, opt2, sched2 = _make()
    first = _train(net2, opt2, sched2, range(5))
    buf = io.BytesIO()
    torch.save({"net": net2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    net3, opt3, sched3 = _make(seed=1)  # different starting weights: everything comes from the save
    net3.load_state_dict(saved["net"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    state = opt3.state[net3.extra]
    assert state["lr_code"].dtype == torch.int16 and state["sign"].dtype == torch.int8
    assert state["exp_avg_sq"].dtype == torch.float32  # not cast to the bf16 parameter's dtype
    rest = _train(net3, opt3, sched3, range(5, 12))

    assert first + rest == straight
    for (k, a), b in zip(net.state_dict().items(), net3.state_dict().values()):
        assert torch.equal(a, b), k
    assert opt.mean_learning_rates() == opt3.mean_learning_rates()


def test_round_trip_through_checkpoint_files(tmp_path: Path):
    from aitk.trainer.state import CheckpointContent, TrainerState, read_content, write_content

    net, opt, sched = _make()
    _train(net, opt, sched, range(3))
    write_content(tmp_path, CheckpointContent(
        state=TrainerState(step=3), network={}, optimizer=opt.state_dict(),
        lr_scheduler=sched.state_dict(), rng_per_rank=[],
    ))
    expected = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = Automagic(  # other settings: the saved groups replace them
        [{"params": [*net2.conv.parameters(), net2.extra]}, {"params": list(net2.lin.parameters())}], lr=1e-3,
    )
    opt2.load_state_dict(read_content(tmp_path).optimizer)
    got = opt2.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    for i, st in expected["state"].items():
        for k, v in st.items():
            assert (torch.equal(v, got["state"][i][k]) and v.dtype == got["state"][i][k].dtype) \
                if isinstance(v, torch.Tensor) else v == got["state"][i][k], (i, k)
    assert all(torch.equal(a, got["automagic_rng"][d]) for d, a in expected["automagic_rng"].items())


# ------------------------------------------------------------------------------ training

def _fit(name: str, lr: float, params: dict, seed: int, steps: int = 200) -> float:
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 8)
    with torch.no_grad():
        y = teacher(x)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = build_optimizer(name, [{"params": list(model.parameters())}], lr=lr, optimizer_params=params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (model(x) - y).pow(2).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_model_trains_as_well_as_adamw(seed):
    # Both start at lr 1e-3; Automagic may raise each element's rate by 1e-4 per repeated sign,
    # up to 1e-2 (and down to 1e-4). Minibatch regression onto a random teacher MLP, 200 steps.
    automagic = _fit("automagic", 1e-3, {"min_lr": 1e-4, "max_lr": 1e-2, "lr_bump": 1e-4}, seed)
    adamw = _fit("adamw", 1e-3, {}, seed)
    assert automagic <= 1.1 * adamw, (automagic, adamw)


def test_trainer_runs_automagic_and_resumes_exactly(make_job):
    import json

    from safetensors.torch import load_file

    from aitk.config.loader import load_job_file
    from aitk.trainer.checkpoint import list_checkpoints
    from aitk.trainer.loop import Trainer

    def train(job: Path, **kwargs):
        loaded = load_job_file(job)
        trainer = Trainer(loaded.job, loaded.job.config.process[0], **kwargs)
        return trainer, trainer.run()

    changes = dict(
        train={"steps": 10, "optimizer": "automagic", "lr": 1e-3, "lr_scheduler": "cosine",
               "optimizer_params": {"min_lr": 1e-4, "max_lr": 1e-2, "lr_bump": 1e-4}},
        save={"save_every": 4},
    )
    straight_trainer, straight = train(make_job("straight", **changes))
    assert straight.state == "completed" and isinstance(straight_trainer.optimizer, Automagic)
    assert straight_trainer.optimizer.last_gradient_stability is not None

    resumed_job = make_job("resumed", **changes)

    def stop_at_4(trainer: Trainer, step: int) -> None:
        if step == 4:
            trainer.stop.request("test")

    _, first = train(resumed_job, on_step_end=stop_at_4)
    assert first.state == "stopped" and first.step == 4
    _, second = train(resumed_job)
    assert second.state == "completed" and second.step == 10

    def final(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(list_checkpoints(run_dir / "checkpoints")[0].path / "network.safetensors"))

    a, b = final(straight.output_dir), final(second.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (second.output_dir / "metrics_resumed.jsonl").read_text().splitlines()]
    straight_metrics = (straight.output_dir / "metrics_straight.jsonl").read_text().splitlines()
    assert [m["loss"] for m in metrics] == [json.loads(x)["loss"] for x in straight_metrics]


def test_invalid_settings_are_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="max_lr"):
        Automagic([p], lr=1e-3, min_lr=1e-3, max_lr=1e-4)
    with pytest.raises(ValueError, match="lr_bump"):
        Automagic([p], lr=1e-3, min_lr=0.0, max_lr=1.0, lr_bump=1e-12)
    big = Automagic([p], lr=1e-3, min_lr=0.0, max_lr=1.0, lr_bump=1e-8)  # 10^8 levels: int32 codes
    _step(big, {p: [1.0, 1.0]})
    _step(big, {p: [1.0, -1.0]})
    assert big.state[p]["lr_code"].dtype == torch.int32
    assert big.learning_rate_mask(p).tolist() == pytest.approx([1e-3 + 1e-8, 1e-3 - 1e-8], rel=1e-6)


def test_wan22_experts_get_their_own_automagic_bounds(tmp_path, shapes_dataset):
    from aitk.models.wan import build_tiny_wan
    from test_training_experts import expert_job, metrics, train

    model = build_tiny_wan(tmp_path / "wan22", "22_t2v")
    job = expert_job(tmp_path, "am", model, shapes_dataset, train={
        "steps": 6, "optimizer": "automagic", "lr": 1e-3,
        "optimizer_params": {"high_noise_max_lr": 1.5e-3, "low_noise_lr_bump": 1e-4,
                             "high_noise_lr": 1e-3, "low_noise_lr": 5e-4},
    })
    trainer, result = train(job)
    assert result.state == "completed"
    groups = trainer.optimizer.param_groups
    assert [g["expert"] for g in groups] == ["high_noise", "low_noise"]
    assert [(g["max_lr"], g["lr_bump"]) for g in groups] == [(1.5e-3, 1e-6), (1e-3, 1e-4)]
    rates = trainer.optimizer.mean_learning_rates()
    records = metrics(result, "am")
    assert records[-1]["lr_1"] == pytest.approx(rates[1]) and rates[1] != 5e-4  # the mask moved
