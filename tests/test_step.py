"""The library's one step (`balanced_step`), its phase check and its composition rules."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from modbalance import (
    BalancingMethod,
    DualPhaseSchedule,
    MMPareto,
    ModalityGame,
    ModbalanceError,
    ShapleyEquilibrium,
    StepOutput,
    UnimodalLoss,
    balanced_step,
    check_phases,
)

MODS = ("text", "audio")


class Tiny(nn.Module):
    """Two encoders, unimodal heads and a mean-fusion head: everything a step needs."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"text": nn.Linear(4, 3), "audio": nn.Linear(2, 3)})
        self.heads = nn.ModuleDict({m: nn.Linear(3, 1) for m in MODS})
        self.head = nn.Linear(3, 1)

    def fuse(self, feats, present):
        w = torch.stack([present[m] for m in MODS], 1).float()
        h = torch.stack([feats[m] for m in MODS], 1) * w.unsqueeze(-1)
        return self.head(h.sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)).squeeze(-1)

    def out(self, x, y, phase=2, step=0):
        feats = {m: self.enc[m](x[m]) for m in MODS}
        uni = {m: self.heads[m](feats[m]).squeeze(-1) for m in MODS}
        present = {m: torch.ones(y.shape[0], dtype=torch.bool) for m in MODS}
        fused = self.fuse(feats, present) if phase == 2 else None
        return StepOutput(feats, uni, fused, present, y, "regression", phase=phase, step=step)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny()
    x = {"text": torch.randn(16, 4), "audio": torch.randn(16, 2)}
    return model, x, torch.randn(16)


class Recorder(BalancingMethod):
    """Records which hooks ran; optionally writes a loss term."""

    def __init__(self, log, name, term=None, phases=(2,)):
        super().__init__()
        self.log, self.name, self.term, self.phases = log, name, term, phases

    def losses(self, out, losses):
        self.log.append(f"{self.name}.losses")
        if self.term is None:
            return dict(losses)
        return {**losses, self.term: out.unimodal["text"].abs().mean()}

    @contextlib.contextmanager
    def around_step(self, out, optimizer):
        self.log.append(f"{self.name}.before")
        yield
        self.log.append(f"{self.name}.after")


def test_plain_step_equals_a_hand_written_one(tiny):
    model, x, y = tiny
    twin = Tiny()
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    schedule = DualPhaseSchedule(switch_epoch=0)
    out = model.out(x, y)
    terms = balanced_step(out, schedule.base_losses(out), [], opt)
    out2 = twin.out(x, y)
    opt2.zero_grad()
    (out2.fused - y).abs().mean().backward()
    opt2.step()
    assert set(terms) == {"task"} and not terms["task"].requires_grad
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_hooks_run_in_order_and_only_in_their_phases(tiny):
    model, x, y = tiny
    log: list[str] = []
    methods = [Recorder(log, "a"), Recorder(log, "b", phases=(1, 2)), Recorder(log, "c", phases=1)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.out(x, y, phase=2)
    balanced_step(out, {"task": (out.fused - y).abs().mean()}, methods, opt)
    assert log == ["a.losses", "b.losses", "a.before", "b.before", "b.after", "a.after"]
    log.clear()
    out = model.out(x, y, phase=1)
    balanced_step(out, DualPhaseSchedule().base_losses(out), methods, opt)
    assert log == ["b.losses", "c.losses", "b.before", "c.before", "c.after", "b.after"]


def test_every_term_trains_something(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients only
    out = model.out(x, y)
    balanced_step(
        out, {"task": (out.fused - y).abs().mean()}, [UnimodalLoss(list(MODS))], opt, zero_grad=True
    )
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_two_methods_writing_one_term_are_refused_by_name(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.out(x, y)
    methods = [Recorder([], "a", term="extra"), Recorder([], "b", term="extra")]
    with pytest.raises(ModbalanceError, match=r"Recorder \(methods\[1\]\) writes the loss term "):
        balanced_step(out, {"task": out.fused.abs().mean()}, methods, opt)


def test_equilibrium_then_unimodal_loss_is_a_conflict(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.out(x, y)
    methods = [ShapleyEquilibrium(list(MODS), beta=0.0), UnimodalLoss(list(MODS))]
    with pytest.raises(
        ModbalanceError,
        match=r"UnimodalLoss \(methods\[1\]\) writes the loss term 'unimodal_text' that "
        r"ShapleyEquilibrium \(methods\[0\]\) already wrote",
    ):
        balanced_step(out, {"task": out.fused.abs().mean()}, methods, opt)


def test_equilibrium_with_mmpareto_is_refused_before_any_parameter_changes(tiny):
    """The issue's case: MMPareto silently replaced the equilibrium's weighted terms."""
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    out = model.out(x, y)
    methods = [
        ShapleyEquilibrium(list(MODS), beta=0.0),
        MMPareto({m: model.enc[m] for m in MODS}),
    ]
    with pytest.raises(ModbalanceError, match=r"MMPareto \(methods\[1\]\) writes the loss term"):
        balanced_step(out, {"task": out.fused.abs().mean()}, methods, opt)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q)


def test_two_backward_takers_are_refused_before_either_runs(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ran = []

    class Taker(BalancingMethod):
        takes_backward = True

        def backward(self, out, losses):
            ran.append(type(self).__name__)
            return True

    out = model.out(x, y)
    with pytest.raises(ModbalanceError, match=r"Taker \(methods\[0\]\) and Taker \(methods\[1\]\)"):
        balanced_step(out, {"task": out.fused.abs().mean()}, [Taker(), Taker()], opt)
    assert ran == []
    # in disjoint phases they compose
    a, b = Taker(), Taker()
    b.phases = (1,)
    balanced_step(out, {"task": out.fused.abs().mean()}, [a, b], opt)
    assert ran == ["Taker"]


def test_a_method_that_needs_the_game_gets_it(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eq = ShapleyEquilibrium(list(MODS), momentum=0.0, learnable_margin=None)
    out = model.out(x, y)
    with pytest.raises(ModbalanceError, match="needs the batch's Shapley game: pass `game=`"):
        balanced_step(out, {"task": out.fused.abs().mean()}, [eq], opt)
    game = ModalityGame(model.fuse, MODS, masking="present", value="neg_mae", task="regression")
    out = model.out(x, y)
    balanced_step(out, {"task": out.fused.abs().mean()}, [eq], opt, game=game)
    assert bool(eq.initialized)
    # steps between games keep the last shares
    shares = eq.shares.clone()
    out = model.out(x, y, step=1)
    balanced_step(out, {"task": out.fused.abs().mean()}, [eq], opt, game=game, game_every=2)
    torch.testing.assert_close(eq.shares, shares)


def test_bad_arguments(tiny):
    model, x, y = tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.out(x, y)
    losses = {"task": out.fused.abs().mean()}
    with pytest.raises(ModbalanceError, match=r"`out.phase` must be the int 1 .* got '2'"):
        balanced_step(out._replace(phase="2"), losses, [], opt)
    with pytest.raises(TypeError, match="`out` must be a StepOutput"):
        balanced_step(tuple(out), losses, [], opt)
    with pytest.raises(TypeError, match="`methods` must be a list of BalancingMethod"):
        balanced_step(out, losses, UnimodalLoss(list(MODS)), opt)
    with pytest.raises(TypeError, match=r"`methods\[0\]` must be a BalancingMethod"):
        balanced_step(out, losses, [nn.Linear(1, 1)], opt)
    with pytest.raises(ModbalanceError, match="game_every"):
        balanced_step(out, losses, [], opt, game_every=0)
    with pytest.raises(ValueError, match="`losses` is empty"):
        balanced_step(out, {}, [], opt)


def test_check_phases():
    assert check_phases(1) == (1,) and check_phases([2, 1]) == (2, 1)
    with pytest.raises(TypeError, match=r"`phases` must be phase numbers .* got '2' \(str\)"):
        check_phases("2")
    with pytest.raises(TypeError, match="phase numbers"):
        check_phases(True)
    with pytest.raises(ModbalanceError, match=r"phases of the dual-phase schedule \(1, 2\), got 3"):
        check_phases((2, 3))
    with pytest.raises(ModbalanceError, match="at least one phase"):
        check_phases(())
    with pytest.raises(TypeError, match="phase numbers"):
        ShapleyEquilibrium(list(MODS), phases="2")
    with pytest.raises(TypeError, match="phase numbers"):
        UnimodalLoss(list(MODS), phases="2")
