"""DGL and UME: parity with the released code / the paper, gradient routing, masks, errors, state.

DGL's parity tests compare our method with a transcription of the authors' code
(shicaiwei123/ICCV2025-GDL: ``main_dgl.py``'s ``train_epoch`` and ``models/fusion_modules.py``'s
``ConcatFusion_DGL`` and ``SumFusion_DGL``), written out below; it has two modalities and
classification only, so the M = 3 and regression references generalise it by hand (the sum of the
unimodal losses over every modality; L1 in place of cross-entropy). UME (Du et al., ICML 2023)
came without code: its references are the paper's rule written out by hand (M models trained
alone; the mean of their outputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _reference import assert_grads_close, grads, grads_differ
from torch import nn

from modbalance import DGL, UME, ModbalanceError
from modbalance.balancing import StepOutput, combine_losses, task_loss
from modbalance.methods.dgl import encoder_only
from modbalance.methods.ume import ume_ensemble

DIMS2 = {"audio": 3, "visual": 5}
DIMS3 = {"text": 3, "audio": 2, "visual": 4}
HIDDEN = 4
CLASSES = 3


def make_data(dims, n, task, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    y = torch.randn(n, generator=g) if task == "regression" else torch.randint(0, CLASSES, (n,))
    return x, y


def loss_fn(task):
    """The released loop's criterion (cross-entropy); L1 for regression (our generalisation)."""
    if task == "regression":
        return lambda pred, y: F.l1_loss(pred[:, 0], y)
    return nn.CrossEntropyLoss()


# ==========================================================================================
# DGL: a late-fusion model with the released fusion heads
# ==========================================================================================


class DGLNet(nn.Module):
    """Encoders and a released-style fusion module (``concat``: ``fc_out``; ``sum``: ``fc_<m>``)."""

    def __init__(self, dims, out_dim, fusion="concat"):
        super().__init__()
        self.modalities = tuple(dims)
        self.kind = fusion
        self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in dims.items()})
        if fusion == "concat":
            self.fusion_module = nn.ModuleDict({"fc_out": nn.Linear(HIDDEN * len(dims), out_dim)})
        else:
            self.fusion_module = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in dims})

    def encode(self, x):
        return {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}

    def fuse(self, z, present):
        """Absent modalities contribute nothing: zero-filled (concat) or left out (sum)."""
        if self.kind == "concat":
            parts = [z[m] * present[m].to(z[m].dtype)[:, None] for m in self.modalities]
            return self.fusion_module["fc_out"](torch.cat(parts, 1))
        out = 0
        for m in self.modalities:
            out = out + self.fusion_module[m](z[m]) * present[m].to(z[m].dtype)[:, None]
        return out

    def step(self, x, y, task, present=None):
        z = self.encode(x)
        n = y.shape[0]
        full = {m: torch.ones(n, dtype=torch.bool) for m in self.modalities}
        present = present or full
        fused = self.fuse(z, present)
        out = StepOutput(z, {}, fused, present, y, task, phase=2, fuse=self.fuse)
        return out, {"task": task_loss(fused, y, task)}


def released_dgl_step(net: DGLNet, x, y, task, alpha):
    """Transcription of ``train_epoch`` of ``main_dgl.py`` with ``*Fusion_DGL.forward``.

    ``ConcatFusion_DGL``: ``output = fc_out(cat(x, y).detach())``, ``x_out = fc_out(cat(x, 0))``,
    ``y_out = fc_out(cat(0, y))``; ``SumFusion_DGL``: ``outx = fc_x(x)``, ``output =
    fc_x(x.detach()) + fc_y(y.detach())``. Then ``(loss_a + loss_v) * alpha`` backward with
    ``retain_graph``, every parameter of the fusion module ``grad = None``, ``loss_f`` backward.
    """
    crit = loss_fn(task)
    feats = net.encode(x)
    names = net.modalities
    fm = net.fusion_module
    if net.kind == "concat":
        output = fm["fc_out"](torch.cat([feats[m] for m in names], 1).detach())
        outs = [
            fm["fc_out"](
                torch.cat([feats[k] if k == m else torch.zeros_like(feats[k]) for k in names], 1)
            )
            for m in names
        ]
    else:
        output = sum(fm[m](feats[m].detach()) for m in names)
        outs = [fm[m](feats[m]) for m in names]
    loss_f = crit(output, y)
    loss_unimodal = sum(crit(o, y) for o in outs) * alpha
    loss_unimodal.backward(retain_graph=True)
    for name, p in net.named_parameters():
        layer = str(name).split(".")[0]  # the code's split(".")[1] after DataParallel's "module."
        if "fusion" in layer:
            p.grad = None
    loss_f.backward()
    return grads(net)


def ours_dgl_step(net: DGLNet, x, y, task, alpha, present=None, **options):
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task, present)
    terms = DGL(net.modalities, alpha=alpha, **options).losses(out, base)
    combine_losses(terms).backward()
    return grads(net), terms


CASES = [
    pytest.param(DIMS2, "classification", "concat", id="M2-cls-concat"),
    pytest.param(DIMS2, "classification", "sum", id="M2-cls-sum"),
    pytest.param(DIMS3, "classification", "concat", id="M3-cls-concat"),
    pytest.param(DIMS2, "regression", "concat", id="M2-reg-concat"),
    pytest.param(DIMS3, "regression", "sum", id="M3-reg-sum"),
]


@pytest.mark.parity
@pytest.mark.parametrize(("dims", "task", "fusion"), CASES)
@pytest.mark.parametrize("alpha", [4.0, 5.0])
def test_dgl_gradients_match_the_released_code(dims, task, fusion, alpha):
    torch.manual_seed(0)
    net = DGLNet(dims, 1 if task == "regression" else CLASSES, fusion)
    x, y = make_data(dims, 10, task)
    ours, _ = ours_dgl_step(net, x, y, task, alpha)
    net.zero_grad(set_to_none=True)
    ref = released_dgl_step(net, x, y, task, alpha)
    assert_grads_close(ours, ref)
    # every parameter got a gradient: the comparison is not vacuous
    assert all(g.abs().sum() > 0 for g in ref.values())


def _perturbed_reference(net, x, y, task, alpha, how):
    """The released step with one part of the rule changed."""
    crit = loss_fn(task)
    net.zero_grad(set_to_none=True)
    feats = net.encode(x)
    names = net.modalities
    fc = net.fusion_module["fc_out"]
    cat = torch.cat([feats[m] for m in names], 1)
    output = fc(cat if how == "no-detach" else cat.detach())
    outs = [
        fc(torch.cat([feats[k] if k == m else torch.zeros_like(feats[k]) for k in names], 1))
        for m in names
    ]
    a = 1.0 if how == "alpha" else alpha
    (sum(crit(o, y) for o in outs) * a).backward(retain_graph=True)
    if how != "keep-head-grad":
        for name, p in net.named_parameters():
            if "fusion" in name.split(".")[0]:
                p.grad = None
    crit(output, y).backward()
    return grads(net)


@pytest.mark.parity
@pytest.mark.parametrize("how", ["no-detach", "keep-head-grad", "alpha"])
def test_dgl_parity_catches_a_perturbed_rule(how):
    torch.manual_seed(0)
    net = DGLNet(DIMS3, CLASSES)
    x, y = make_data(DIMS3, 10, "classification")
    ours, _ = ours_dgl_step(net, x, y, "classification", 4.0)
    assert grads_differ(ours, _perturbed_reference(net, x, y, "classification", 4.0, how))


@pytest.mark.parity
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_dgl_heads_variant_pins_its_deviation(task):
    """``unimodal="heads"``: the encoders get the same gradient as the released
    ``ConcatFusion_DGL_unimodal`` (an auxiliary head per modality); the heads train (released: their
    gradient is discarded too, so they stay at their initialisation)."""
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    net = DGLNet(DIMS2, out_dim)
    heads = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in DIMS2})
    x, y = make_data(DIMS2, 10, task)
    crit = loss_fn(task)
    # the released form, with one auxiliary head per modality (nulled like the fusion module)
    z = net.encode(x)
    (sum(crit(heads[m](z[m]), y) for m in DIMS2) * 4.0).backward()
    ref_enc = {k: v for k, v in grads(net).items() if k.startswith("encoders")}
    net.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task)
    uni = {m: heads[m](out.features[m]) for m in DIMS2}
    if task == "regression":
        uni = {m: u[:, 0] for m, u in uni.items()}
    out = out._replace(unimodal=uni)
    terms = DGL(tuple(DIMS2), unimodal="heads").losses(out, {**base, "readout": base["task"]})
    assert set(terms) == {"task", "unimodal_audio", "unimodal_visual"}  # readout dropped
    combine_losses(terms).backward()
    ours_enc = {k: v for k, v in grads(net).items() if k.startswith("encoders")}
    assert_grads_close(ours_enc, ref_enc)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


# ------------------------------------------------------------------------------------------
# DGL: which parameters receive which gradient
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("unimodal", ["fusion", "heads"])
def test_dgl_routes_fused_gradient_to_the_head_and_unimodal_to_the_encoders(dims, task, unimodal):
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    net = DGLNet(dims, out_dim)
    heads = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in dims})
    x, y = make_data(dims, 12, task)

    def terms():
        net.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        out, base = net.step(x, y, task)
        uni = {m: heads[m](out.features[m]) for m in dims}
        out = out._replace(unimodal={m: u[:, 0] for m, u in uni.items()} if out_dim == 1 else uni)
        return DGL(tuple(dims), unimodal=unimodal).losses(out, base)

    fused_only = terms()["task"]
    fused_only.backward()
    assert all(p.grad is None for p in net.encoders.parameters())  # no fused gradient
    assert all(p.grad.abs().sum() > 0 for p in net.fusion_module.parameters())
    unimodal_only = sum(v for k, v in terms().items() if k.startswith("unimodal_"))
    unimodal_only.backward()
    assert all(p.grad is None for p in net.fusion_module.parameters())  # no unimodal gradient
    for m in dims:
        assert net.encoders[m].weight.grad.abs().sum() > 0
    trained = [p.grad is not None for p in heads.parameters()]
    assert all(trained) if unimodal == "heads" else not any(trained)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_dgl_term_values_are_the_losses_they_stand_for(task):
    torch.manual_seed(0)
    net = DGLNet(DIMS3, 1 if task == "regression" else CLASSES)
    x, y = make_data(DIMS3, 9, task)
    out, base = net.step(x, y, task)
    terms = DGL(tuple(DIMS3), alpha={"text": 1.0, "audio": 2.0, "visual": 0.5}).losses(out, base)
    torch.testing.assert_close(terms["task"], base["task"])  # same value, other gradient
    full = {m: torch.ones(9, dtype=torch.bool) for m in DIMS3}
    for m, a in (("text", 1.0), ("audio", 2.0), ("visual", 0.5)):
        alone = {k: full[k] & (k == m) for k in DIMS3}
        expected = a * task_loss(net.fuse(out.features, alone), y, task)
        torch.testing.assert_close(terms[f"unimodal_{m}"], expected)


def test_dgl_presence_masks_drop_absent_samples_from_both_losses():
    torch.manual_seed(0)
    net = DGLNet(DIMS3, CLASSES)
    x, y = make_data(DIMS3, 8, "classification")
    present = {m: torch.ones(8, dtype=torch.bool) for m in DIMS3}
    present["audio"] = torch.tensor([True, False, True, False, True, True, False, True])
    ours, _ = ours_dgl_step(net, x, y, "classification", 4.0, present)
    # the rule written out: alpha * mean over present samples of CE(head on m alone), through a
    # frozen copy of the head; the head's loss on detached features with absent ones zero-filled
    frozen = copy.deepcopy(net.fusion_module).requires_grad_(False)
    net.zero_grad(set_to_none=True)
    z = net.encode(x)
    total = 0
    for m in DIMS3:
        parts = [z[k] * (present[k] & (k == m)).float()[:, None] for k in DIMS3]
        per = F.cross_entropy(frozen["fc_out"](torch.cat(parts, 1)), y, reduction="none")
        total = total + 4.0 * per[present[m]].mean()
    parts = [z[k].detach() * present[k].float()[:, None] for k in DIMS3]
    total = total + F.cross_entropy(net.fusion_module["fc_out"](torch.cat(parts, 1)), y)
    total.backward()
    assert_grads_close(ours, grads(net))
    # an absent sample's audio input changes nothing
    x2 = {**x, "audio": x["audio"].clone()}
    x2["audio"][~present["audio"]] = 100.0
    again, _ = ours_dgl_step(net, x2, y, "classification", 4.0, present)
    assert_grads_close(again, ours)


def test_dgl_with_the_example_model_keeps_the_rule():
    """The registered ``"dgl"`` on the example's late-fusion model (M = 3, regression)."""
    from examples.pase import PaSEConfig, build

    names = ("text", "audio", "vision")
    cfg = PaSEConfig(names, dict.fromkeys(names, 5), dim=8, input_kind="vector", decision="head")
    parts = build(cfg, methods=["dgl"])
    (dgl,) = parts.methods
    g = torch.Generator().manual_seed(0)
    batch = {
        "features": {m: torch.randn(6, 5, generator=g) for m in names},
        "mask": {m: torch.ones(6, dtype=torch.bool) for m in names},
        "label": torch.randn(6, generator=g),
    }
    out, base = parts.model(batch, 2)
    terms = dgl.losses(out, base)
    assert set(terms) == {"task", "readout", *(f"unimodal_{m}" for m in names)}
    terms["task"].backward()
    assert all(p.grad is None for p in parts.model.encoders.parameters())
    assert parts.model.head[0].weight.grad.abs().sum() > 0


def test_dgl_leaves_other_phases_alone_and_keeps_only_what_it_is_told():
    torch.manual_seed(0)
    net = DGLNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 6, "classification")
    out, base = net.step(x, y, "classification")
    base = {**base, "alignment": base["task"] * 0.1, "readout": base["task"] * 0.2}
    assert DGL(tuple(DIMS2)).losses(out._replace(phase=1), base) == base
    assert set(DGL(tuple(DIMS2)).losses(out, base)) == {
        "task",
        "readout",
        "unimodal_audio",
        "unimodal_visual",
    }
    kept = DGL(tuple(DIMS2), keep=("alignment",)).losses(out, base)
    assert kept["alignment"] is base["alignment"] and "readout" not in kept
    assert DGL(tuple(DIMS2), phases=(1, 2)).losses(out._replace(phase=1), base).keys() == (
        DGL(tuple(DIMS2)).losses(out, base).keys()
    )


def test_encoder_only_keeps_the_value_and_stops_at_the_features():
    w = nn.Linear(3, 2)
    head = nn.Linear(2, 1)
    x = torch.randn(5, 3)
    z = w(x)
    loss = (head(z) ** 2).mean()
    wrapped = encoder_only(loss, [z])
    torch.testing.assert_close(wrapped.detach(), loss.detach(), rtol=0, atol=0)
    wrapped.backward()
    assert head.weight.grad is None
    expected = torch.autograd.grad((head(w(x)) ** 2).mean(), list(w.parameters()))
    torch.testing.assert_close(w.weight.grad, expected[0])
    torch.testing.assert_close(w.bias.grad, expected[1])


def test_dgl_summary_state_and_contract():
    dgl = DGL(["text", "audio", "vision"], alpha={"text": 1.0, "audio": 2.0, "vision": 3.0})
    assert dgl.summary() == {
        "coefficient_text": 1.0,
        "coefficient_audio": 2.0,
        "coefficient_vision": 3.0,
    }
    assert dgl.predict({}, None) is None and not dgl.needs_game and not dgl.takes_backward
    state = dgl.state_dict()
    fresh = DGL(["text", "audio", "vision"])
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.coefficients, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        DGL(["audio", "text", "vision"]).load_state_dict(state)
    bad = {**state, "coefficients": torch.tensor([1.0, -1.0, 1.0])}
    with pytest.raises(ModbalanceError, match=r"`coefficients` must be >= 0"):
        fresh.load_state_dict(bad)


def test_dgl_errors_name_the_argument():
    with pytest.raises(ModbalanceError, match="at least 2"):
        DGL(["text"])
    with pytest.raises(ModbalanceError, match="alpha"):
        DGL(["a", "b"], alpha=-1.0)
    with pytest.raises(ModbalanceError, match="alpha"):
        DGL(["a", "b"], alpha={"a": 1.0})
    with pytest.raises(ModbalanceError, match="`unimodal`"):
        DGL(["a", "b"], unimodal="both")
    with pytest.raises(ModbalanceError, match="`keep` must not contain 'task'"):
        DGL(["a", "b"], keep=("task",))
    torch.manual_seed(0)
    net = DGLNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 6, "classification")
    out, base = net.step(x, y, "classification")
    with pytest.raises(ModbalanceError, match=r"out\.fuse"):
        DGL(tuple(DIMS2)).losses(out._replace(fuse=None), base)
    with pytest.raises(ModbalanceError, match="missing 'text'"):
        DGL(["text", "audio"]).losses(out, base)
    with pytest.raises(ModbalanceError, match="missing 'audio'"):
        DGL(tuple(DIMS2), unimodal="heads").losses(out, base)
    frozen = {m: z.detach() for m, z in out.features.items()}
    with pytest.raises(ModbalanceError, match="carry no gradient"):
        DGL(tuple(DIMS2)).losses(out._replace(features=frozen), base)


# ==========================================================================================
# UME
# ==========================================================================================


class UMENet(nn.Module):
    def __init__(self, dims, out_dim):
        super().__init__()
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in dims.items()})
        self.heads = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in dims})
        self.fusion = nn.Linear(HIDDEN * len(dims), out_dim)
        self.out_dim = out_dim

    def step(self, x, y, task, present):
        z = {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}
        uni = {m: self.heads[m](z[m]) for m in self.modalities}
        fused = self.fusion(torch.cat([z[m] for m in self.modalities], 1))
        if self.out_dim == 1:
            uni = {m: u[:, 0] for m, u in uni.items()}
            fused = fused[:, 0]
        out = StepOutput(z, uni, fused, present, y, task)
        return out, {"task": task_loss(fused, y, task), "readout": task_loss(fused, y, task)}


def _masks(dims, n, seed):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(n, generator=g) > 0.3 for m in dims}


def _train_joint(net, data, task, ume, steps):
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for x, y, present in data[:steps]:
        opt.zero_grad(set_to_none=True)
        out, base = net.step(x, y, task, present)
        combine_losses(ume.losses(out, base)).backward()
        opt.step()


def _train_alone(net, data, task, m, steps):
    """The paper's UME: modality m's model (encoder + head), trained by itself on its samples."""
    enc, head = copy.deepcopy(net.encoders[m]), copy.deepcopy(net.heads[m])
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=0.05)
    for x, y, present in data[:steps]:
        opt.zero_grad(set_to_none=True)
        keep = present[m]
        pred = head(torch.tanh(enc(x[m][keep])))
        loss = (
            F.l1_loss(pred[:, 0], y[keep])
            if task == "regression"
            else F.cross_entropy(pred, y[keep])
        )
        loss.backward()
        opt.step()
    return enc, head


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_ume_training_is_m_models_trained_alone(dims, task):
    # float64: L1's sign gradient under Adam would turn float32 rounding differences between a
    # batch and its subset (the joint model sees all rows, the alone model its own) into flips
    torch.manual_seed(0)
    net = UMENet(dims, 1 if task == "regression" else CLASSES).double()
    data = []
    for s in range(3):
        x, y = make_data(dims, 12, task, seed=s)
        x = {m: v.double() for m, v in x.items()}
        data.append((x, y.double() if task == "regression" else y, _masks(dims, 12, s)))
    alone = {m: _train_alone(net, data, task, m, 3) for m in dims}
    fusion_before = copy.deepcopy(net.fusion.state_dict())
    perturbed = copy.deepcopy(net)
    _train_joint(net, data, task, UME(tuple(dims), net.heads), 3)
    for m, (enc, head) in alone.items():
        for a, b in zip(
            [*net.encoders[m].parameters(), *net.heads[m].parameters()],
            [*enc.parameters(), *head.parameters()],
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k, v in net.fusion.state_dict().items():  # the fusion head is never trained
        torch.testing.assert_close(v, fusion_before[k], rtol=0, atol=0)
    # a perturbed rule (the fused loss kept) is caught
    _train_joint(perturbed, data, task, UME(tuple(dims), perturbed.heads, keep=("task",)), 3)
    m = next(iter(dims))
    assert not torch.allclose(perturbed.encoders[m].weight, net.encoders[m].weight, atol=1e-5)


def _hand_mean(preds, present, n):
    """The ensemble written out: per sample, the mean over its present modalities."""
    rows = []
    for i in range(n):
        have = [preds[m][i] for m in preds if present is None or bool(present[m][i])]
        rows.append(
            sum(have) / len(have) if have else torch.zeros_like(preds[next(iter(preds))][i])
        )
    return torch.stack(rows)


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("masked", [False, True])
def test_ume_predict_is_the_mean_of_the_unimodal_outputs(dims, task, masked):
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    net = UMENet(dims, out_dim)
    x, _ = make_data(dims, 7, task)
    z = {m: torch.tanh(net.encoders[m](x[m])) for m in dims}
    present = _masks(dims, 7, 3) if masked else None
    if present is not None:
        present[next(iter(dims))][0] = False
        for m in dims:
            present[m][1] = False  # a sample without any modality: 0
    got = UME(tuple(dims), net.heads).predict(z, present)
    preds = {m: net.heads[m](z[m]) for m in dims}
    if out_dim == 1:
        preds = {m: p[:, 0] for m, p in preds.items()}
    expected = _hand_mean(preds, present, 7)
    torch.testing.assert_close(got, expected)
    assert got.shape == ((7,) if out_dim == 1 else (7, CLASSES))
    perturbed = _hand_mean(preds, None, 7) if masked else expected * 1.01
    assert not torch.allclose(got, perturbed)


def test_ume_probability_ensemble_returns_the_log_mean_probability():
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    got = ume_ensemble({"a": a, "b": b}, combine="probs")
    torch.testing.assert_close(got.softmax(-1), (a.softmax(-1) + b.softmax(-1)) / 2)
    torch.testing.assert_close(ume_ensemble({"a": a, "b": b}), (a + b) / 2)
    only_a = {"a": torch.tensor([True]), "b": torch.tensor([False])}
    torch.testing.assert_close(
        ume_ensemble({"a": a, "b": b}, only_a, combine="probs").softmax(-1), a.softmax(-1)
    )
    nan_b = {"a": a, "b": torch.full_like(b, float("nan"))}  # an absent row may hold NaN
    torch.testing.assert_close(ume_ensemble(nan_b, only_a), a)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_ume_gradients_stay_within_each_modality(task):
    torch.manual_seed(0)
    net = UMENet(DIMS3, 1 if task == "regression" else CLASSES)
    x, y = make_data(DIMS3, 10, task)
    present = {m: torch.ones(10, dtype=torch.bool) for m in DIMS3}
    out, base = net.step(x, y, task, present)
    terms = UME(tuple(DIMS3), net.heads).losses(out, base)
    assert set(terms) == {f"unimodal_{m}" for m in DIMS3}
    terms["unimodal_audio"].backward()
    assert net.encoders["audio"].weight.grad.abs().sum() > 0
    assert net.heads["audio"].weight.grad.abs().sum() > 0
    others = [*net.encoders["text"].parameters(), *net.heads["visual"].parameters()]
    assert all(p.grad is None for p in [*others, *net.fusion.parameters()])


def test_ume_with_the_example_model_trains_no_fusion_head():
    from examples.pase import PaSEConfig, build, train_step

    names = ("text", "audio")
    cfg = PaSEConfig(
        names,
        dict.fromkeys(names, 5),
        dim=8,
        input_kind="vector",
        task="classification",
        num_outputs=3,
    )
    parts = build(cfg, methods=["ume"])
    head_before = copy.deepcopy(parts.model.head.state_dict())
    g = torch.Generator().manual_seed(0)
    batch = {
        "features": {m: torch.randn(6, 5, generator=g) for m in names},
        "mask": {m: torch.ones(6, dtype=torch.bool) for m in names},
        "label": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    for phase in (1, 2):
        terms = train_step(parts, batch, phase)
        assert set(terms) == {"unimodal_text", "unimodal_audio"}
    for k, v in parts.model.head.state_dict().items():
        torch.testing.assert_close(v, head_before[k], rtol=0, atol=0)
    (ume,) = parts.methods
    assert ume.state_dict().keys() == {"_extra_state"}  # the model's heads are not copied
    assert not list(ume.parameters())
    pred = parts.model.predict(batch)
    own = ume.predict(pred["features"], pred["present"])
    torch.testing.assert_close(own, (pred["unimodal"]["text"] + pred["unimodal"]["audio"]) / 2)


def test_ume_state_round_trip_and_contract():
    heads = {m: nn.Linear(2, 1) for m in ("text", "audio")}
    ume = UME(["text", "audio"], heads)
    assert not hasattr(ume, "coefficients") and ume.summary() == {}
    assert ume.phases == (1, 2) and not ume.needs_game
    state = ume.state_dict()
    UME(["text", "audio"], heads).load_state_dict(state)
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        UME(["audio", "text"], heads).load_state_dict(state)


def test_ume_leaves_other_phases_alone():
    torch.manual_seed(0)
    net = UMENet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 6, "classification")
    out, base = net.step(x, y, "classification", {})
    assert UME(tuple(DIMS2), net.heads, phases=(2,)).losses(out._replace(phase=1), base) == base
    kept = UME(tuple(DIMS2), net.heads, keep="readout").losses(out, base)
    assert set(kept) == {"readout", "unimodal_audio", "unimodal_visual"}


def test_ume_errors_name_the_argument():
    heads = {m: nn.Linear(2, 3) for m in ("a", "b")}
    with pytest.raises(ModbalanceError, match="at least 2"):
        UME(["a"], heads)
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        UME(["a", "b"], {"a": heads["a"]})
    with pytest.raises(TypeError, match=r"`heads\['b'\]` must be callable"):
        UME(["a", "b"], {"a": heads["a"], "b": 3})
    with pytest.raises(TypeError, match="`heads` must map"):
        UME(["a", "b"], [heads["a"], heads["b"]])
    with pytest.raises(ModbalanceError, match="`combine`"):
        UME(["a", "b"], heads, combine="vote")
    ume = UME(["a", "b"], heads)
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        ume.predict({"a": torch.randn(4, 2)})
    z = {m: torch.randn(4, 2) for m in heads}
    with pytest.raises(ModbalanceError, match=r"`present` has no mask for modality 'b'"):
        ume.predict(z, {"a": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ModbalanceError, match=r"`present\['a'\]` must have shape \(4,\)"):
        ume.predict(z, {"a": torch.ones(5, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ModbalanceError, match="same shape"):
        ume_ensemble({"a": torch.zeros(4, 3), "b": torch.zeros(4, 2)})
    with pytest.raises(ModbalanceError, match="combine='probs'"):
        ume_ensemble({"a": torch.zeros(4), "b": torch.zeros(4)}, combine="probs")
    with pytest.raises(ModbalanceError, match="non-empty mapping"):
        ume_ensemble({})
    out = StepOutput(
        {"a": torch.zeros(4, 2)},
        {"a": torch.zeros(4, 3)},
        None,
        {},
        torch.zeros(4, dtype=torch.long),
        "classification",
    )
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        ume.losses(out, {})
