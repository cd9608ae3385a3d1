"""Optimizer factory, lr schedulers and the network EMA (aitk.optim)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aitk.optim import (
    NetworkEMA,
    OptimizerConfigError,
    build_lr_scheduler,
    build_optimizer,
    check_scheduler_params,
)


def _bnb_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.optim import AdamW8bit  # noqa: F401
    except Exception:
        return False
    return True


def _one_step(opt: torch.optim.Optimizer, lin: torch.nn.Linear) -> None:
    torch.manual_seed(0)
    lin(torch.randn(3, lin.in_features)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ optimizers

@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "prodigy", "lion", "sgd", "AdamW"])
def test_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    before = [p.detach().clone() for p in lin.parameters()]
    lr = 1.0 if name == "prodigy" else 1e-2
    opt = build_optimizer(name, [{"params": list(lin.parameters())}], lr=lr, optimizer_params={})
    _one_step(opt, lin)
    assert all(not torch.equal(b, p) for b, p in zip(before, lin.parameters()))
    assert opt.param_groups[0]["lr"] == lr  # prodigy too: lr is used as given


# bitsandbytes is optional at run time (diffusers imports it at start-up whenever it is installed,
# which costs about a second of launch time), so `make install` puts it in .venv/extras for this test.
EXTRAS = Path(__file__).resolve().parents[1] / ".venv" / "extras"


def test_adamw8bit_steps_with_8bit_state(monkeypatch):
    if EXTRAS.is_dir():
        monkeypatch.syspath_prepend(str(EXTRAS))
    assert _bnb_importable(), "bitsandbytes is missing: `make install` puts it in .venv/extras"
    lin = torch.nn.Linear(64, 64)  # 4096 weights: bitsandbytes keeps 8-bit state from 4096 elements
    before = lin.weight.detach().clone()
    opt = build_optimizer("adamw8bit", [{"params": list(lin.parameters())}], lr=1e-2, optimizer_params={})
    _one_step(opt, lin)
    assert not torch.equal(before, lin.weight)
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8


def test_adamw8bit_without_bitsandbytes_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(OptimizerConfigError) as e:
        build_optimizer("adamw8bit", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={})
    msg = str(e.value)
    assert "train.optimizer" in msg and "pip install bitsandbytes" in msg and "adamw" in msg


def test_unknown_optimizer_param_names_key_and_accepted():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(OptimizerConfigError) as e:
        build_optimizer("adamw", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={"betaz": [0.9, 0.99]})
    msg = str(e.value)
    assert "train.optimizer_params.betaz" in msg and "betas" in msg and "weight_decay" in msg


def test_lr_inside_optimizer_params_is_refused():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(OptimizerConfigError, match=r"train\.optimizer_params\.lr.*train\.lr"):
        build_optimizer("adamw", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={"lr": 1})


def test_automagic_and_unknown_names():
    lin = torch.nn.Linear(2, 2)
    from aitk.optim.automagic import Automagic

    opt = build_optimizer("automagic", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={})
    assert isinstance(opt, Automagic)
    with pytest.raises(OptimizerConfigError, match="train.optimizer.*adamw"):
        build_optimizer("adamx", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={})


def test_adamw_takes_the_fused_kernel_by_default_unless_told():
    """Fused on the CPU too (one pass instead of a Python loop of ops per tensor); an explicit
    fused / foreach in optimizer_params wins; the fused update matches the loop's."""
    torch.manual_seed(0)
    lin, twin = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    twin.load_state_dict(lin.state_dict())
    fused = build_optimizer("adamw", [{"params": list(lin.parameters())}], lr=1e-2, optimizer_params={})
    loop = build_optimizer("adamw", [{"params": list(twin.parameters())}], lr=1e-2,
                           optimizer_params={"fused": False})
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert build_optimizer("adamw", [{"params": list(lin.parameters())}], lr=1e-2,
                           optimizer_params={"foreach": True}).defaults["fused"] is None
    for _ in range(5):
        _one_step(fused, lin)
        _one_step(loop, twin)
    for a, b in zip(lin.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_params_are_coerced_and_defaults_applied():
    lin = torch.nn.Linear(2, 2)
    # YAML 1.1 reads 1e-2 as a string; lists become tuples
    opt = build_optimizer(
        "adamw", [{"params": list(lin.parameters())}], lr=1e-3,
        optimizer_params={"weight_decay": "1e-2", "betas": [0.9, "0.99"]},
    )
    g = opt.param_groups[0]
    assert g["weight_decay"] == pytest.approx(0.01) and g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6
    ada = build_optimizer("adafactor", [{"params": list(lin.parameters())}], lr=1e-3, optimizer_params={})
    assert ada.defaults["relative_step"] is False and ada.defaults["scale_parameter"] is False
    assert ada.defaults["warmup_init"] is False
    ada2 = build_optimizer("adafactor", [{"params": list(lin.parameters())}], lr=1e-3,
                           optimizer_params={"scale_parameter": True})
    assert ada2.defaults["scale_parameter"] is True


def test_group_lrs_and_expert_keys():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer(
        "adamw",
        [{"params": list(a.parameters()), "lr": 5e-4}, {"params": list(b.parameters())}],
        lr=1e-3,
        optimizer_params={"high_noise_lr": 1e-4, "low_noise_lr": 2e-4},  # fork keys: not ctor args
    )
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]


def test_factory_import_is_lazy():
    code = (
        "import sys, aitk.optim, aitk.optim.factory, aitk.trainer.loss\n"
        "heavy = [m for m in ('bitsandbytes', 'transformers', 'prodigyopt', 'lion_pytorch', 'diffusers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ schedulers

def _curve(name, steps, *, total, warmup=0, params=None, lrs=(1.0,)):
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(ps, lrs)], lr=lrs[0])
    sched = build_lr_scheduler(opt, name, total_steps=total, warmup_steps=warmup, params=params)
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return [o[0] if len(lrs) == 1 else o for o in out], sched, opt


def test_constant_and_constant_with_warmup():
    c, _, _ = _curve("constant", 5, total=5)
    assert c == [1.0] * 6
    w, _, _ = _curve("constant_with_warmup", 6, total=10, warmup=4)
    assert w == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # plain constant with warmup is not dropped: it becomes constant_with_warmup
    w2, _, _ = _curve("constant", 2, total=10, warmup=2)
    assert w2 == pytest.approx([0.0, 0.5, 1.0])


def test_cosine_without_and_with_warmup():
    c, _, _ = _curve("cosine", 12, total=10)
    assert c[0] == pytest.approx(1.0) and c[5] == pytest.approx(0.5) and c[10] == pytest.approx(0.0, abs=1e-12)
    assert c[12] == pytest.approx(0.0, abs=1e-12)  # past the end it stays at the end value
    w, _, _ = _curve("cosine_with_warmup", 12, total=12, warmup=2)
    assert w[0] == 0.0 and w[1] == pytest.approx(0.5) and w[2] == pytest.approx(1.0)
    assert w[7] == pytest.approx(0.5) and w[12] == pytest.approx(0.0, abs=1e-12)
    p, _, _ = _curve("cosine", 2, total=12, params={"warmup_steps": 2})  # warmup from params
    assert p == pytest.approx([0.0, 0.5, 1.0])


def test_cosine_eta_min_and_group_ratios():
    c, _, _ = _curve("cosine", 10, total=10, params={"eta_min": 0.1})
    assert c[0] == pytest.approx(1.0) and c[10] == pytest.approx(0.1) and c[5] == pytest.approx(0.55)
    g, _, _ = _curve("cosine", 5, total=10, lrs=(1.0, 0.5))
    assert g[5] == pytest.approx([0.5, 0.25])


def test_cosine_with_restarts_linear_polynomial():
    r, _, _ = _curve("cosine_with_restarts", 10, total=10, params={"num_cycles": 2})
    assert r[0] == pytest.approx(1.0) and r[5] == pytest.approx(1.0)
    assert r[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))
    lin, _, _ = _curve("linear", 10, total=10, warmup=2)
    assert lin[1] == pytest.approx(0.5) and lin[2] == pytest.approx(1.0)
    assert lin[6] == pytest.approx(0.5) and lin[10] == pytest.approx(0.0)
    poly, _, _ = _curve("polynomial", 10, total=10, params={"power": 2})
    assert poly[5] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7) and poly[10] == pytest.approx(1e-7)


def test_ai_toolkit_style_scheduler_params():
    lin, sched, _ = _curve("linear", 4, total=1000, params={"start_factor": 1.0, "end_factor": 0.5, "total_iters": 4})
    assert isinstance(sched, torch.optim.lr_scheduler.LinearLR)
    assert lin[0] == pytest.approx(1.0) and lin[4] == pytest.approx(0.5)
    c, _, _ = _curve("cosine", 4, total=1000, params={"T_max": 4})
    assert c[2] == pytest.approx(0.5) and c[4] == pytest.approx(0.0, abs=1e-12)
    cfg = check_scheduler_params("cosine_with_restarts", total_steps=100, params={"T_0": 25})
    assert cfg["num_cycles"] == 4


def test_cosine_with_restarts_t_mult_matches_torch_warm_restarts():
    """ai-toolkit builds torch's CosineAnnealingWarmRestarts from T_0 / T_mult / eta_min."""
    ours, _, _ = _curve("cosine_with_restarts", 28, total=28, params={"T_0": 4, "T_mult": 2, "eta_min": 0.1})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=0.1)
    theirs = [opt.param_groups[0]["lr"]]
    for _ in range(28):
        opt.step()
        ref.step()
        theirs.append(opt.param_groups[0]["lr"])
    assert ours[:28] == pytest.approx(theirs[:28])
    assert ours[4] == pytest.approx(1.0) and ours[12] == pytest.approx(1.0)  # restarts after 4 and 4 + 8 steps
    # with warmup and num_cycles, T_0 is chosen so that the growing cycles fill the remaining steps
    cfg = check_scheduler_params("cosine_with_restarts", total_steps=100, warmup_steps=30,
                                 params={"T_mult": 2, "num_cycles": 3})
    assert cfg["T_0"] == 10 and cfg["T_mult"] == 2  # 10 + 20 + 40 = 70 steps after warmup
    w, _, _ = _curve("cosine_with_restarts", 100, total=100, warmup=30, params={"T_mult": 2, "num_cycles": 3})
    assert w[15] == pytest.approx(0.5) and w[30] == pytest.approx(1.0) and w[40] == pytest.approx(1.0)
    assert w[60] == pytest.approx(1.0) and w[50] == pytest.approx(0.5) and w[59] < 0.01
    with pytest.raises(OptimizerConfigError, match="T_mult"):
        check_scheduler_params("cosine_with_restarts", total_steps=10, params={"T_mult": 1.5})


def test_scheduler_errors_name_the_key():
    with pytest.raises(OptimizerConfigError, match="train.lr_scheduler.*cosine_with_warmup"):
        check_scheduler_params("cosin", total_steps=10)
    with pytest.raises(OptimizerConfigError, match=r"train\.lr_scheduler_params\.nm_cycles.*num_cycles"):
        check_scheduler_params("cosine_with_restarts", total_steps=10, params={"nm_cycles": 2})
    with pytest.raises(OptimizerConfigError, match="warmup"):
        check_scheduler_params("cosine", total_steps=10, warmup_steps=10)


def test_scheduler_state_dict_resumes_exactly():
    curve, sched, opt = _curve("cosine_with_warmup", 3, total=10, warmup=2)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)  # picklable (no closures in the state)
    buf.seek(0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_lr_scheduler(opt2, "cosine_with_warmup", total_steps=10, warmup_steps=2)
    sched2.load_state_dict(torch.load(buf, weights_only=False))
    full, _, _ = _curve("cosine_with_warmup", 6, total=10, warmup=2)
    for expected in full[4:]:
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(expected)


# ------------------------------------------------------------------------------ EMA

def _net():
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    return lin, dict(lin.named_parameters())


def test_ema_update_uses_decay_warmup():
    lin, params = _net()
    ema = NetworkEMA(params, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update()  # decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 0.9))
    ema.update()  # decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), d * 0.9 + (1 - d)))
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == 0.9


def test_ema_state_dict_round_trip():
    lin, params = _net()
    ema = NetworkEMA(params, decay=0.99)
    for v in (1.0, 2.0, 3.0):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    ema2 = NetworkEMA(params, decay=0.99)
    ema2.load_state_dict(torch.load(buf))
    assert ema2.num_updates == 3
    ema.update()
    ema2.update()
    for k in ema.shadow:
        assert torch.equal(ema.shadow[k], ema2.shadow[k])
    with pytest.raises(KeyError):
        NetworkEMA({"other": torch.nn.Parameter(torch.zeros(1))}, 0.9).load_state_dict(ema.state_dict())


def test_ema_applied_restores_and_copy_to():
    lin, params = _net()
    ema = NetworkEMA(lin.named_parameters(), decay=0.9)  # (name, param) pairs work too
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update()
    with ema.applied():
        assert torch.allclose(lin.weight, torch.full((2, 3), 0.9))
    assert torch.equal(lin.weight, torch.ones(2, 3))
    with pytest.raises(RuntimeError):
        with ema.applied():
            raise RuntimeError("boom")
    assert torch.equal(lin.weight, torch.ones(2, 3))
    out = {"weight": torch.zeros(2, 3, dtype=torch.bfloat16)}
    ema.copy_to(out)
    assert torch.allclose(out["weight"].float(), torch.full((2, 3), 0.9), atol=1e-2)


def test_ema_from_config():
    from aitk.config.schema import EmaConfig

    _, params = _net()
    assert NetworkEMA.from_config(params, EmaConfig()) is None
    ema = NetworkEMA.from_config(params, EmaConfig(use_ema=True, ema_decay=0.95))
    assert ema is not None and ema.decay == 0.95
