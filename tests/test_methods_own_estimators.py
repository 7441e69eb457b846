"""Tests of the PMR, CGGM and MLA balancing methods, with parity against the official rules.

Every ``@pytest.mark.parity`` test holds a short transcription of the authors' released code
(function names and variable names kept) and compares it with our implementation on the same
inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modbalance._checks import ModbalanceError
from modbalance.balancing import StepOutput, combine_losses, task_loss
from modbalance.methods.cggm import (
    CGGM,
    cggm_coefficients,
    cggm_direction_loss,
    unimodal_accuracy,
)
from modbalance.methods.inforeg import InfoReg, inforeg_beta, inforeg_window_k
from modbalance.methods.mla import MLA, mla_entropy_weights, mla_fuse
from modbalance.methods.pmr import PMR, pmr_coefficients
from modbalance.prototypes import class_means, sentiment_classes

DT = torch.float64


def _present(n, names):
    return {m: torch.ones(n, dtype=torch.bool) for m in names}


def _out(
    features, target, *, task="classification", fused=None, unimodal=None, step=0, present=None
):
    names = list(features)
    n = target.shape[0]
    return StepOutput(
        features=features,
        unimodal=unimodal or {},
        fused=fused,
        present=present or _present(n, names),
        target=target,
        task=task,
        step=step,
    )


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# =============================================================================================
# PMR
# =============================================================================================


def official_pmr_loss(a, v, out, label, audio_proto, visual_proto, alpha):
    """Transcription of ``main_Prototype_grad.py::train_epoch`` (modulation == 'Proto')."""
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)

    def EU_dist(x1, x2):  # the official name
        d_matrix = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype).to(x1.device)
        for i in range(x1.shape[0]):
            for j in range(x2.shape[0]):
                d = torch.sqrt(torch.dot((x1[i] - x2[j]), (x1[i] - x2[j])))
                d_matrix[i, j] = d
        return d_matrix

    audio_sim = -EU_dist(a, audio_proto)
    visual_sim = -EU_dist(v, visual_proto)
    score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
    score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
    ratio_a_p = score_a_p / score_v_p
    loss_proto_a = criterion(audio_sim, label)
    loss_proto_v = criterion(visual_sim, label)
    if ratio_a_p > 1:
        beta = 0
        lam = 1 * alpha
    elif ratio_a_p < 1:
        beta = 1 * alpha
        lam = 0
    else:
        beta = 0
        lam = 0
    loss = criterion(out, label) + beta * loss_proto_a + lam * loss_proto_v
    return loss, float(ratio_a_p.detach()), (beta, lam)


def official_calculate_prototype(batches, n_classes, dim, momentum_coef, epoch, a_proto=None):
    """Transcription of ``calculate_prototype`` for one modality (the 10% cut left out)."""
    audio_prototypes = torch.zeros(n_classes, dim, dtype=DT)
    count_class = [0 for _ in range(n_classes)]
    for a, label in batches:
        for c, l in enumerate(label):  # noqa: E741 - the official names
            l = l.long()  # noqa: E741
            count_class[l] += 1
            audio_prototypes[l, :] += a[c, :]
    for c in range(audio_prototypes.shape[0]):
        audio_prototypes[c, :] /= count_class[c]
    if epoch <= 0:
        return audio_prototypes
    return (1 - momentum_coef) * audio_prototypes + momentum_coef * a_proto


def _set_prototypes(pmr, protos):
    with torch.no_grad():
        for name, p in protos.items():
            calib = pmr.calibrators[name]
            calib.prototypes.copy_(p)
            calib.initialized.fill_(True)


@pytest.mark.parity
@pytest.mark.parametrize("weak", ["audio", "visual"])
def test_pmr_parity_loss_and_gradients(weak):
    n, d, k, alpha = 9, 4, 3, 1.7
    label = torch.arange(n) % k
    a = torch.randn(n, d, dtype=DT, requires_grad=True)
    v = torch.randn(n, d, dtype=DT, requires_grad=True)
    out_logits = torch.randn(n, k, dtype=DT, requires_grad=True)
    # Prototypes: the strong modality's are its class means, the weak one's are random.
    with torch.no_grad():
        means = {
            "audio": class_means(a, label, k).means,
            "visual": class_means(v, label, k).means,
        }
        protos = {m: means[m].clone() for m in means}
        protos[weak] = torch.randn(k, d, dtype=DT) * 3
    ref_loss, ratio, (beta, lam) = official_pmr_loss(
        a, v, out_logits, label, protos["audio"], protos["visual"], alpha
    )
    assert (beta, lam) == ((alpha, 0) if weak == "audio" else (0, alpha))
    ref_grads = torch.autograd.grad(ref_loss, [a, v, out_logits])

    pmr = PMR({"audio": d, "visual": d}, k, alpha=alpha, update="manual").to(DT)
    _set_prototypes(pmr, protos)
    out = _out({"audio": a, "visual": v}, label, fused=out_logits)
    losses = pmr.losses(out, {"task": task_loss(out_logits, label, "classification")})
    total = combine_losses(losses)
    grads = torch.autograd.grad(total, [a, v, out_logits])
    torch.testing.assert_close(total, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert float(pmr.ratio[0]) == pytest.approx(ratio)
    assert float(pmr.ratio[1]) == pytest.approx(1 / ratio)


@pytest.mark.parity
def test_pmr_parity_prototype_epochs():
    """Manual accumulate/commit reproduces the released per-epoch prototype rule."""
    k, d, mu = 3, 4, 0.2
    epochs = [
        [(torch.randn(6, d, dtype=DT), torch.arange(6) % k) for _ in range(3)] for _ in range(3)
    ]
    pmr = PMR({"audio": d, "visual": d}, k, momentum=mu, update="manual").to(DT)
    ref = None
    for e, batches in enumerate(epochs):
        ref = official_calculate_prototype(batches, k, d, mu, e, ref)
        for a, y in batches:
            pmr.accumulate({"audio": a, "visual": a * 2}, y)
        pmr.commit()
        torch.testing.assert_close(pmr.calibrators["audio"].prototypes, ref)
        torch.testing.assert_close(pmr.calibrators["visual"].prototypes, 2 * ref)
    assert pmr.acc_sums_0.abs().sum() == 0  # accumulators cleared


def test_pmr_epoch_mode_initialises_then_folds_at_epoch_end():
    """Documented: a new class is initialised from its first batch, EMA only at epoch end."""
    k, d, mu = 3, 2, 0.2
    pmr = PMR({"a": d, "b": d}, k, momentum=mu).to(DT)
    b1 = torch.randn(6, d, dtype=DT)
    b2 = torch.randn(6, d, dtype=DT)
    y = torch.arange(6) % k
    pmr.losses(_out({"a": b1, "b": b1}, y), {})
    first = class_means(b1, y, k).means
    torch.testing.assert_close(pmr.calibrators["a"].prototypes, first)
    pmr.losses(_out({"a": b2, "b": b2}, y), {})
    torch.testing.assert_close(pmr.calibrators["a"].prototypes, first)  # unchanged in-epoch
    pmr.epoch_end(0)
    epoch_mean = class_means(torch.cat([b1, b2]), torch.cat([y, y]), k).means
    torch.testing.assert_close(pmr.calibrators["a"].prototypes, mu * first + (1 - mu) * epoch_mean)
    assert int(pmr.epoch) == 1


def test_pmr_step_mode_folds_every_batch():
    k, d, mu = 2, 3, 0.5
    pmr = PMR({"a": d, "b": d}, k, momentum=mu, update="step").to(DT)
    y = torch.tensor([0, 1, 0, 1])
    x1, x2 = torch.randn(4, d, dtype=DT), torch.randn(4, d, dtype=DT)
    pmr.losses(_out({"a": x1, "b": x1}, y), {})
    pmr.losses(_out({"a": x2, "b": x2}, y), {})
    m1, m2 = class_means(x1, y, k).means, class_means(x2, y, k).means
    torch.testing.assert_close(pmr.calibrators["a"].prototypes, mu * m1 + (1 - mu) * m2)


@pytest.mark.parity
def test_pmr_coefficients_two_modalities_match_code_switch():
    for sa, sv in [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0)]:
        ratio_a_p = sa / sv
        if ratio_a_p > 1:
            beta, lam = 0, 0.5
        elif ratio_a_p < 1:
            beta, lam = 0.5, 0
        else:
            beta, lam = 0, 0
        got = pmr_coefficients(torch.tensor([sa, sv]), alpha=0.5).tolist()
        assert got == [beta, lam]


def test_pmr_coefficients_more_modalities_and_errors():
    assert pmr_coefficients(torch.tensor([0.6, 0.3, 0.2])).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        pmr_coefficients(torch.tensor([1.0]))
    with pytest.raises(ModbalanceError, match="alpha"):
        pmr_coefficients(torch.tensor([1.0, 2.0]), alpha=-1.0)


def _pmr_setup(m=3, task="classification", n=12, d=4, k=3):
    names = ["text", "audio", "video"][:m]
    enc = nn.ModuleDict({nm: nn.Linear(5, d) for nm in names})
    x = {nm: torch.randn(n, 5) for nm in names}
    if task == "regression":
        target = torch.linspace(-3, 3, n)
    else:
        target = torch.arange(n) % k
    return names, enc, x, target


def test_pmr_three_modalities_boosts_laggards_and_grads_reach_encoders():
    names, enc, x, y = _pmr_setup(3)
    pmr = PMR(dict.fromkeys(names, 4), 3, update="manual", entropy_weight=0.5, entropy_epochs=2)
    feats = {m: enc[m](x[m]) for m in names}
    with torch.no_grad():
        protos = {m: class_means(feats[m], y, 3).means for m in names}
        protos["video"] = torch.randn(3, 4) * 5  # video lags
    _set_prototypes(pmr, protos)
    losses = pmr.losses(_out(feats, y), {})
    assert set(losses) == {"pmr", "pmr_entropy"}
    coef = dict(zip(names, pmr.coefficients.tolist()))
    assert coef["video"] == 1.0
    for term in ("pmr", "pmr_entropy"):
        enc.zero_grad()
        losses[term].backward(retain_graph=True)
        boosted = (
            [m for m in names if coef[m] > 0]
            if term == "pmr"
            else [m for m in names if float(pmr.ratio[names.index(m)]) > 1]
        )
        assert boosted
        for m in boosted:
            assert _grad_norm(enc[m]) > 0, (term, m)


def test_pmr_regression_bins_labels():
    names, enc, x, y = _pmr_setup(2, "regression", k=7)
    with pytest.raises(ModbalanceError, match="label_bins"):
        PMR(dict.fromkeys(names, 4), 7).losses(
            _out({m: enc[m](x[m]) for m in names}, y, task="regression"), {}
        )
    pmr = PMR(dict.fromkeys(names, 4), label_bins=7)
    feats = {m: enc[m](x[m]) for m in names}
    losses = pmr.losses(_out(feats, y, task="regression"), {"task": torch.tensor(0.0)})
    assert torch.isfinite(losses["pmr"])
    bins = sentiment_classes(y, 7)
    assert pmr.calibrators["text"].initialized.tolist() == [
        bool((bins == c).any()) for c in range(7)
    ]


def test_pmr_window_and_presence():
    names, enc, x, y = _pmr_setup(2)
    pmr = PMR(dict.fromkeys(names, 4), 3, start_epoch=1, end_epoch=1)
    feats = {m: enc[m](x[m]) for m in names}
    assert set(pmr.losses(_out(feats, y), {"task": torch.tensor(1.0)})) == {"task"}
    pmr.epoch_end(0)
    assert "pmr" in pmr.losses(_out(feats, y), {})
    pmr.epoch_end(1)
    assert "pmr" not in pmr.losses(_out(feats, y), {})
    # a modality absent everywhere has no score: no coefficient is switched on
    pmr2 = PMR(dict.fromkeys(names, 4), 3)
    present = {"text": torch.ones(12, dtype=torch.bool), "audio": torch.zeros(12, dtype=torch.bool)}
    losses = pmr2.losses(_out(feats, y, present=present), {})
    assert pmr2.coefficients.tolist() == [0.0, 0.0]
    assert torch.isfinite(losses["pmr"])


def test_pmr_state_dict_round_trip():
    names, enc, x, y = _pmr_setup(2)
    feats = {m: enc[m](x[m]).detach() for m in names}
    pmr = PMR(dict.fromkeys(names, 4), 3)
    pmr.losses(_out(feats, y), {})
    pmr.epoch_end(0)
    pmr.losses(_out(feats, y), {})
    other = PMR(dict.fromkeys(names, 4), 3)
    other.load_state_dict(pmr.state_dict())
    for key, val in pmr.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val, equal_nan=True)
    torch.testing.assert_close(
        other.eval().losses(_out(feats, y), {})["pmr"], pmr.eval().losses(_out(feats, y), {})["pmr"]
    )


def test_pmr_argument_checks():
    with pytest.raises(ModbalanceError, match="alpha"):
        PMR({"a": 2, "b": 2}, 3, alpha=-1)
    with pytest.raises(ModbalanceError, match="update"):
        PMR({"a": 2, "b": 2}, 3, update="sometimes")
    with pytest.raises(ModbalanceError, match="end_epoch"):
        PMR({"a": 2, "b": 2}, 3, start_epoch=3, end_epoch=1)
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        PMR({"a": 2}, 3)
    with pytest.raises(ModbalanceError, match="label_bins"):
        PMR({"a": 2, "b": 2}, 3, label_bins=7)
    with pytest.raises(ModbalanceError, match="num_classes"):
        PMR({"a": 2, "b": 2})
    with pytest.raises(ModbalanceError, match="momentum"):
        PMR({"a": 2, "b": 2}, 3, momentum=1.5)
    pmr = PMR({"a": 2, "b": 2}, 3)
    with pytest.raises(ModbalanceError, match=r"shape \(N, 2\)"):
        pmr.losses(_out({"a": torch.randn(3, 5), "b": torch.randn(3, 2)}, torch.arange(3)), {})
    with pytest.raises(ModbalanceError, match="missing modality"):
        pmr.losses(_out({"a": torch.randn(3, 2)}, torch.arange(3)), {})


# =============================================================================================
# CGGM
# =============================================================================================


def official_cggm_coefficients(acc_sequence, num_mod):
    """Transcription of the coefficient part of ``msatrain.py::train``."""
    acc1 = [0] * num_mod
    out = []
    for acc2 in acc_sequence:
        diff = [acc2[i] - acc1[i] for i in range(num_mod)]
        diff_sum = sum(diff) + 1e-8
        coeff = list()
        for d in diff:
            coeff.append((diff_sum - d) / diff_sum)
        acc1 = acc2
        out.append(coeff)
    return out


def official_train_eval_senti(results, truths, exclude_zero=False):
    """Transcription of ``eval_metrics.py::train_eval_senti`` (accuracy_score in numpy)."""
    test_preds = results.view(-1).cpu().detach().numpy()
    test_truth = truths.view(-1).cpu().detach().numpy()
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0 or (not exclude_zero)])
    binary_truth = test_truth[non_zeros] > 0
    binary_preds = test_preds[non_zeros] > 0
    return float(np.mean(binary_truth == binary_preds))


def official_l_gm(coeff, llist, num_mod):
    l_gm = np.sum(np.abs(coeff)) - (coeff[0] * llist[0] + coeff[1] * llist[1] + coeff[2] * llist[2])
    return l_gm / num_mod


class _Fixed(nn.Module):
    """A classifier whose outputs we choose: it returns its input (plus a trainable zero)."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))

    def forward(self, h):
        return h + self.zero


@pytest.mark.parity
def test_cggm_parity_coefficients_over_steps_regression():
    """Sign accuracies of unimodal regressors -> B, as the released MOSI loop computes them."""
    names = ["text", "audio", "vision"]
    n = 10
    enc = {m: nn.Linear(1, 1) for m in names}
    cggm = CGGM(enc, {m: _Fixed() for m in names}, lam=0.0)
    acc_seq, ours = [], []
    for _step in range(5):
        y = torch.randn(n)
        preds = {m: torch.randn(n, 1) for m in names}
        acc_seq.append([official_train_eval_senti(preds[m], y) for m in names])
        cggm.losses(_out(preds, y, task="regression"), {})
        ours.append(cggm.coefficients.tolist())
        np.testing.assert_allclose(cggm.accuracy.tolist(), acc_seq[-1], rtol=1e-6)
    ref = official_cggm_coefficients(acc_seq, 3)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parity
def test_cggm_parity_magnitude_scaling_and_direction_formula():
    rou = 1.3
    names = ["text", "audio", "vision"]
    enc = nn.ModuleDict({m: nn.Linear(3, 4) for m in names})
    cggm = CGGM(dict(enc), {m: nn.Linear(4, 2) for m in names}, rho=rou, lam=0.0)
    with torch.no_grad():
        cggm.coefficients.copy_(torch.tensor([0.4, -2.0, 1.7]))
    for p in enc.parameters():
        p.grad = torch.randn_like(p)
    expected = {}
    coeff = cggm.coefficients.tolist()
    for i, m in enumerate(names):  # official: params.grad *= (coeff[i] * hyp_params.rou)
        for j, p in enumerate(enc[m].parameters()):
            expected[(m, j)] = p.grad.clone() * (coeff[i] * rou)
    opt = torch.optim.SGD(enc.parameters(), lr=0.0)
    with cggm.around_step(None, opt):  # type: ignore[arg-type]
        opt.step()
    for m in names:
        for j, p in enumerate(enc[m].parameters()):
            torch.testing.assert_close(p.grad, expected[(m, j)])
    # the direction loss formula, for the code's three modalities
    llist = [0.3, -0.8, 0.5]
    ours = cggm_direction_loss(torch.tensor(coeff, dtype=DT), torch.tensor(llist, dtype=DT))
    assert float(ours) == pytest.approx(official_l_gm(coeff, llist, 3), rel=1e-12)


def _cggm_setup(m=2, task="classification", n=8, d=4, c=3):
    names = ["text", "audio", "video"][:m]
    enc = nn.ModuleDict({nm: nn.Linear(5, d) for nm in names})
    out_dim = 1 if task == "regression" else c
    heads = {nm: nn.Linear(d, out_dim) for nm in names}
    fusion = nn.Linear(d * m, out_dim)
    x = {nm: torch.randn(n, 5) for nm in names}
    y = torch.randn(n) if task == "regression" else torch.arange(n) % c
    return names, enc, heads, fusion, x, y


def _cggm_forward(names, enc, fusion, x, y, task="classification", step=0):
    feats = {m: enc[m](x[m]) for m in names}
    fused = fusion(torch.cat([feats[m] for m in names], 1))
    if task == "regression":
        fused = fused[:, 0]
    return _out(feats, y, task=task, fused=fused, step=step)


def test_cggm_direction_uses_gradients_not_weights():
    """Pins the documented fix: the cosine is between gradients w.r.t. each modality's features."""
    names, enc, heads, fusion, x, y = _cggm_setup(2)
    cggm = CGGM(enc, heads, lam=1.0)
    out = _cggm_forward(names, enc, fusion, x, y)
    cggm.losses(out, {})
    fused_loss = task_loss(out.fused, y, "classification")
    g_f = torch.autograd.grad(fused_loss, [out.features[m] for m in names], retain_graph=True)
    for i, m in enumerate(names):
        leaf = out.features[m].detach().requires_grad_(True)
        g_u = torch.autograd.grad(task_loss(heads[m](leaf), y, "classification"), leaf)[0]
        cos = torch.nn.functional.cosine_similarity(g_u.reshape(-1), g_f[i].reshape(-1), dim=0)
        assert float(cggm.cosine[i]) == pytest.approx(float(cos), abs=1e-6)
        # The released code's cosine of weights (classifier vs fusion output layer, same shape
        # there) would not depend on the batch at all; ours does.
    x2 = {m: torch.randn_like(x[m]) for m in names}
    before = cggm.cosine.clone()
    cggm.losses(_cggm_forward(names, enc, fusion, x2, y), {})
    assert not torch.allclose(before, cggm.cosine)


def test_cggm_terms_carry_gradient_where_documented():
    names, enc, heads, fusion, x, y = _cggm_setup(3)
    cggm = CGGM(enc, heads, lam=1.0)
    cggm.losses(_cggm_forward(names, enc, fusion, x, y), {})  # first step: B from accuracies
    # make the accuracies change so B differs from 1
    losses = cggm.losses(_cggm_forward(names, enc, fusion, x, y), {})
    with torch.no_grad():
        cggm.coefficients.copy_(torch.tensor([0.5, 1.0, 1.5]))
    losses = cggm.losses(_cggm_forward(names, enc, fusion, x, y), {})
    enc.zero_grad()
    cggm.zero_grad()
    losses["cggm_direction"].backward(retain_graph=True)
    for m in names:
        assert _grad_norm(enc[m]) > 0, m  # second-order gradient reaches every encoder
    enc.zero_grad()
    losses["cggm_classifier"].backward()
    assert all(_grad_norm(enc[m]) == 0 for m in names)  # classifiers never train encoders
    assert all(_grad_norm(cggm.heads[m]) > 0 for m in names)


def test_cggm_regression_and_presence():
    names, enc, heads, fusion, x, y = _cggm_setup(3, "regression")
    cggm = CGGM(enc, heads)
    out = _cggm_forward(names, enc, fusion, x, y, task="regression")
    losses = cggm.losses(out, {"task": task_loss(out.fused, y, "regression")})
    assert torch.isfinite(combine_losses(losses))
    combine_losses(losses).backward()
    preds = {m: heads[m](out.features[m]) for m in names}
    for i, m in enumerate(names):
        assert float(cggm.accuracy[i]) == pytest.approx(official_train_eval_senti(preds[m], y))
    mask = torch.tensor([True, False] * 4)
    acc = unimodal_accuracy(
        torch.tensor([1.0, 1, -1, 1, 1, 1, -1, 1]), torch.ones(8), "regression", mask
    )
    assert float(acc) == pytest.approx(0.5)


def test_cggm_update_mode_equals_grad_mode_under_sgd():
    results = []
    for mode in ("grad", "update"):
        torch.manual_seed(0)
        names, enc, heads, fusion, x, y = _cggm_setup(2)
        cggm = CGGM(enc, heads, apply=mode, lam=0.5)
        opt = torch.optim.SGD([*enc.parameters(), *fusion.parameters(), *cggm.parameters()], lr=0.1)
        for step in range(3):
            opt.zero_grad()
            out = _cggm_forward(names, enc, fusion, x, y, step=step)
            losses = cggm.losses(out, {"task": task_loss(out.fused, y, "classification")})
            combine_losses(losses).backward()
            with cggm.around_step(out, opt):
                opt.step()
        results.append([p.detach().clone() for p in enc.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_cggm_max_abs_coefficient_and_state_dict():
    names, enc, heads, fusion, x, y = _cggm_setup(2)
    cggm = CGGM(enc, heads, max_abs_coefficient=2.0)
    acc_prev = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        cggm.accuracy.copy_(acc_prev)
    cggm.losses(_cggm_forward(names, enc, fusion, x, y), {})
    raw = cggm_coefficients(cggm.accuracy, acc_prev)
    torch.testing.assert_close(cggm.coefficients, raw.clamp(-2, 2))
    other = CGGM(dict(enc), {m: nn.Linear(4, 3) for m in names})
    other.load_state_dict(cggm.state_dict())
    for key, val in cggm.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val, equal_nan=True)


def test_cggm_argument_checks():
    names, enc, heads, fusion, x, y = _cggm_setup(2)
    with pytest.raises(ModbalanceError, match="one classifier per modality"):
        CGGM(enc, {"text": heads["text"]})
    with pytest.raises(ModbalanceError, match="lam"):
        CGGM(enc, heads, lam=-1)
    with pytest.raises(ModbalanceError, match="rho"):
        CGGM(enc, heads, rho=0)
    with pytest.raises(ModbalanceError, match="apply"):
        CGGM(enc, heads, apply="both")
    with pytest.raises(ModbalanceError, match="share parameters"):
        CGGM(enc, {"text": enc["text"], "audio": heads["audio"]})
    with pytest.raises(ModbalanceError, match="at least 2"):
        CGGM({"text": enc["text"]}, {"text": heads["text"]})
    with pytest.raises(ModbalanceError, match="same shape"):
        cggm_coefficients(torch.zeros(2), torch.zeros(3))
    cggm = CGGM(enc, heads)
    out = _cggm_forward(names, enc, fusion, x, y)
    detached = out._replace(features={m: f.detach() for m, f in out.features.items()})
    with pytest.raises(ModbalanceError, match="require grad"):
        cggm.losses(detached, {})
    with pytest.raises(ModbalanceError, match="lacks modalities"):
        cggm.losses(out._replace(features={"text": out.features["text"]}), {})


# =============================================================================================
# MLA
# =============================================================================================


class OfficialGSPlugin:
    """Transcription of ``utils/utils.py::GSPlugin`` (CPU, float64, ``dim`` instead of 512)."""

    def __init__(self, dim):
        with torch.no_grad():
            self.Pl = torch.eye(dim, dtype=DT)
        self.exp_count = 0

    def before_update(
        self,
        model,
        before_batch_input,
        batch_index,
        len_dataloader,
        train_exp_counter,
        weight_name="module.weight",
    ):
        lamda = batch_index / len_dataloader + 1
        alpha = 1.0 * 0.1**lamda
        if train_exp_counter != 0:
            for n, w in model.named_parameters():
                if n == weight_name:
                    r = torch.mean(before_batch_input, 0, True)
                    k = torch.mm(self.Pl, torch.t(r))
                    self.Pl = torch.sub(self.Pl, torch.mm(k, torch.t(k)) / (alpha + torch.mm(k, r)))
                    pnorm2 = torch.norm(self.Pl.data, p="fro")
                    self.Pl.data = self.Pl.data / pnorm2
                    w.grad.data = torch.mm(w.grad.data, torch.t(self.Pl.data))


@pytest.mark.parity
def test_mla_parity_gradient_projection():
    d, c, steps_per_epoch = 5, 3, 4
    names = ["audio", "visual", "text"]
    mla = MLA(names, d, c, steps_per_epoch=steps_per_epoch, denominator="outer").to(DT)
    ref_head = nn.Linear(d, c).to(DT)
    plugin = OfficialGSPlugin(d)
    for t in range(7):
        h = torch.randn(6, d, dtype=DT)
        g = torch.randn(c, d, dtype=DT)
        batch_index = t % steps_per_epoch
        if t and batch_index == 0:
            mla.epoch_end(t // steps_per_epoch - 1)
        # ours
        out = _out({m: h for m in names}, torch.arange(6) % c, step=t)
        mla.losses(out, {})
        mla.head.weight.grad = g.clone()
        with mla.around_step(out, None):  # type: ignore[arg-type]
            pass
        # official, with the name check satisfied (the paper's intended rule)
        ref_head.weight.grad = g.clone()
        plugin.before_update(
            ref_head, h, batch_index, steps_per_epoch, plugin.exp_count, weight_name="weight"
        )
        plugin.exp_count += 1
        torch.testing.assert_close(mla.head.weight.grad, ref_head.weight.grad)
        torch.testing.assert_close(mla.projector, plugin.Pl)
    assert int(mla.updates) == 7


def test_mla_scalar_denominator_is_owm():
    """The default projector step is OWM's: P - P r^T r P / (alpha + r P r^T), then normalised."""
    d = 4
    mla = MLA(["a", "b"], d, 2).to(DT)
    with torch.no_grad():
        mla.updates.fill_(1)  # past the unprojected first update
    p = torch.eye(d, dtype=DT)
    for _ in range(3):
        r = torch.randn(1, d, dtype=DT)
        g = torch.randn(2, d, dtype=DT)
        mla.head.weight.grad = g.clone()
        mla.project_gradient(r)
        p = p - (p @ r.t() @ r @ p) / (0.1 + float(r @ p @ r.t()))
        p = p / torch.linalg.norm(p)
        torch.testing.assert_close(mla.projector, p)
        torch.testing.assert_close(mla.head.weight.grad, g @ p.t())
    # the projected gradient is (nearly) orthogonal to directions fitted before
    r = torch.randn(1, d, dtype=DT) * 10
    for _ in range(5):
        mla.head.weight.grad = torch.randn(2, d, dtype=DT)
        mla.project_gradient(r)
    g = mla.head.weight.grad
    assert float((g @ r.t()).abs().max()) < 1e-2 * float(g.norm() * r.norm())


@pytest.mark.parity
def test_mla_released_code_never_projects_and_project_false_matches():
    """Pins the documented deviation: as released, the 'module.weight' check never matches."""
    d, c = 4, 2
    head = nn.Linear(d, c).to(DT)
    plugin = OfficialGSPlugin(d)
    mla = MLA(["a", "b"], d, c, project=False).to(DT)
    for t in range(3):
        g = torch.randn(c, d, dtype=DT)
        head.weight.grad = g.clone()
        h = torch.randn(5, d, dtype=DT)
        plugin.before_update(head, h, t, 10, t)  # weight_name "module.weight", as released
        out = _out({"a": h, "b": h}, torch.arange(5) % c, step=t)
        mla.losses(out, {})
        mla.head.weight.grad = g.clone()
        with mla.around_step(out, None):  # type: ignore[arg-type]
            pass
        torch.testing.assert_close(head.weight.grad, g)
        torch.testing.assert_close(mla.head.weight.grad, g)


def official_calculate_entropy(output):
    probabilities = torch.softmax(output, dim=0)
    log_probabilities = torch.log(probabilities)
    return -torch.sum(probabilities * log_probabilities)


def official_gating_weights(*outputs):
    """``calculate_gating_weights`` (2) / ``calculate_gating_weights3`` (3), generalised loop."""
    entropies = [official_calculate_entropy(o) for o in outputs]
    max_entropy = max(entropies)
    gates = [torch.exp(max_entropy - e) for e in entropies]
    total = sum(gates)
    return [g / total for g in gates]


@pytest.mark.parity
@pytest.mark.parametrize("m", [2, 3])
def test_mla_parity_entropy_fusion_batch_mode(m):
    outs = [torch.randn(7, 4, dtype=DT) * (i + 1) for i in range(m)]
    gates = official_gating_weights(*outs)
    ref = sum(o * g for o, g in zip(outs, gates))
    names = [f"m{i}" for i in range(m)]
    logits = dict(zip(names, outs))
    w = mla_entropy_weights(logits, mode="batch")
    for n, g in zip(names, gates):
        torch.testing.assert_close(w[n], g)
    torch.testing.assert_close(mla_fuse(logits, mode="batch"), ref)


def test_mla_sample_mode_per_sample_and_presence():
    z = {"a": torch.tensor([[5.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0], [3.0, -3.0]])}
    w = mla_entropy_weights(z)
    assert float(w["a"][0]) > 0.5 > float(w["a"][1])  # each sample trusts its confident modality
    torch.testing.assert_close(w["a"] + w["b"], torch.ones(2))
    present = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])}
    w = mla_entropy_weights(z, present)
    assert float(w["a"][1]) == 0.0 and float(w["b"][1]) == 1.0
    fused = mla_fuse(z, present)
    torch.testing.assert_close(fused[1], z["b"][1])
    # a sample's fusion does not depend on its batch (unlike the released batch mode)
    torch.testing.assert_close(mla_fuse({k: v[:1] for k, v in z.items()})[0], mla_fuse(z)[0])
    with pytest.raises(ModbalanceError, match="weights="):
        mla_entropy_weights({"a": torch.randn(3), "b": torch.randn(3)})
    with pytest.raises(ModbalanceError, match="same shape"):
        mla_entropy_weights({"a": torch.randn(3, 2), "b": torch.randn(3, 4)})
    with pytest.raises(ModbalanceError, match="mode"):
        mla_fuse(z, mode="epoch")


def test_mla_alternation_only_current_encoder_learns():
    names = ["text", "audio", "video"]
    enc = nn.ModuleDict({m: nn.Linear(3, 4) for m in names})
    mla = MLA(names, 4, 3, keep=["reg"])
    x = {m: torch.randn(6, 3) for m in names}
    y = torch.arange(6) % 3
    for step in range(6):
        enc.zero_grad()
        mla.zero_grad()
        out = _out({m: enc[m](x[m]) for m in names}, y, step=step)
        losses = mla.losses(out, {"task": torch.tensor(1.0), "reg": torch.tensor(0.5)})
        cur = names[step % 3]
        assert set(losses) == {f"mla_{cur}", "reg"}
        assert mla.current(step) == cur
        combine_losses(losses).backward()
        for m in names:
            assert (_grad_norm(enc[m]) > 0) == (m == cur)
        assert _grad_norm(mla.head) > 0


def test_mla_regression_and_predict():
    names = ["text", "audio"]
    enc = nn.ModuleDict({m: nn.Linear(3, 4) for m in names})
    y = torch.randn(6)
    out = _out({m: enc[m](torch.randn(6, 3)) for m in names}, y, task="regression")
    with pytest.raises(ModbalanceError, match="out_dim=1"):
        MLA(names, 4, 3).losses(out, {})
    mla = MLA(names, 4, 1)
    loss = mla.losses(out, {})["mla_text"]
    torch.testing.assert_close(loss, task_loss(mla.head(out.features["text"]), y, "regression"))
    pred = mla.predict(out.features)
    heads = [mla.head(out.features[m])[:, 0] for m in names]
    torch.testing.assert_close(pred, (heads[0] + heads[1]) / 2)
    cls = MLA(names, 4, 3)
    assert cls.predict(out.features).shape == (6, 3)


def test_mla_state_dict_and_checks():
    names = ["a", "b"]
    mla = MLA(names, 3, 2)
    for t in range(3):
        h = torch.randn(4, 3)
        out = _out({"a": h, "b": h}, torch.tensor([0, 1, 0, 1]), step=t)
        mla.losses(out, {})
        mla.head.weight.grad = torch.randn(2, 3)
        with mla.around_step(out, None):  # type: ignore[arg-type]
            pass
    other = MLA(names, 3, 2)
    other.load_state_dict(mla.state_dict())
    for key, val in mla.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val)
    assert not torch.allclose(mla.projector, torch.eye(3))
    with pytest.raises(ModbalanceError, match="at least 2"):
        MLA(["a"], 3, 2)
    with pytest.raises(ModbalanceError, match="distinct"):
        MLA(["a", "a"], 3, 2)
    with pytest.raises(TypeError, match="single string"):
        MLA("ab", 3, 2)
    with pytest.raises(ModbalanceError, match=r"nn.Linear\(3, 2\)"):
        MLA(names, 3, 2, head=nn.Linear(4, 2))
    with pytest.raises(ModbalanceError, match="same feature dimension"):
        MLA(names, 3, 2).losses(
            _out({"a": torch.randn(2, 5), "b": torch.randn(2, 3)}, torch.tensor([0, 1])), {}
        )
    with pytest.raises(ModbalanceError, match="lacks modality"):  # around_step reads `out`
        lacking = _out({"b": torch.randn(2, 3)}, torch.tensor([0, 1]))  # step 0 trains "a"
        with MLA(names, 3, 2).around_step(lacking, None):  # type: ignore[arg-type]
            pass
    with pytest.raises(ModbalanceError, match="steps_per_epoch"):
        MLA(names, 3, 2, steps_per_epoch=0)


def test_cggm_warns_once_for_grad_scaling_under_adam():
    names, enc, heads, fusion, x, y = _cggm_setup(2)
    cggm = CGGM(enc, heads, lam=0.0)
    opt = torch.optim.Adam([*enc.parameters(), *fusion.parameters(), *cggm.parameters()])
    for step in range(2):
        out = _cggm_forward(names, enc, fusion, x, y, step=step)
        combine_losses(
            cggm.losses(out, {"task": task_loss(out.fused, y, "classification")})
        ).backward()
        if step == 0:
            with pytest.warns(UserWarning, match="apply='update'"):
                with cggm.around_step(out, opt):
                    opt.step()
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with cggm.around_step(out, opt):
                    opt.step()


# =============================================================================================
# DDP: every rank holds the state one process computes on the whole batch
# =============================================================================================

_DDP_N = 8  # global batch; two equal shards


def _ddp_data():
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(3):
        feats = {m: torch.randn(_DDP_N, 3, generator=g, dtype=DT) for m in ("a", "b")}
        y = torch.randint(0, 3, (_DDP_N,), generator=g)
        grad = torch.randn(3, 3, generator=g, dtype=DT)
        steps.append((feats, y, grad))
    return steps


def _ddp_run(rows: slice) -> dict:
    torch.manual_seed(0)
    pmr = PMR({"a": 3, "b": 3}, 3).to(DT)
    mla = MLA(["a", "b"], 3, 3).to(DT)
    heads = {m: nn.Linear(3, 3).to(DT) for m in ("a", "b")}
    cggm = CGGM({m: nn.Linear(1, 1) for m in ("a", "b")}, heads, lam=0.0)
    for t, (feats, y, grad) in enumerate(_ddp_data()):
        out = _out({m: f[rows] for m, f in feats.items()}, y[rows], step=t)
        pmr.losses(out, {})
        if t == 1:
            pmr.epoch_end(0)
        cggm.losses(out, {})
        mla.losses(out, {})
        mla.head.weight.grad = grad.clone()
        with mla.around_step(out, None):  # type: ignore[arg-type]
            pass
    return {
        "pmr": {k: v.clone() for k, v in pmr.state_dict().items() if torch.is_tensor(v)},
        "mla": {"projector": mla.projector.clone(), "grad": mla.head.weight.grad.clone()},
        "cggm": {
            k: v.clone()
            for k, v in cggm.state_dict().items()
            if torch.is_tensor(v) and "heads" not in k
        },
    }


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = _DDP_N // world
        result = _ddp_run(slice(rank * half, (rank + 1) * half))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_methods_state_identical_across_ranks_and_equal_to_full_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    full = _ddp_run(slice(None))
    local = _ddp_run(slice(0, _DDP_N // 2))  # rank 0's shard without synchronisation
    for part in ("pmr", "mla", "cggm"):
        for key, ref in full[part].items():
            if key.startswith("acc_"):  # rank-local accumulators: they add up to the full batch
                torch.testing.assert_close(ranks[0][part][key] + ranks[1][part][key], ref)
                continue
            for r in ranks:
                torch.testing.assert_close(r[part][key], ref, equal_nan=True, msg=f"{part}.{key}")
    assert not torch.allclose(local["mla"]["projector"], full["mla"]["projector"])
    assert not torch.allclose(
        local["pmr"]["calibrators.a.prototypes"], full["pmr"]["calibrators.a.prototypes"]
    )


def test_absent_rows_may_hold_nan():
    """Presence masks: rows of an absent modality never reach a loss or a gradient."""
    names = ["text", "audio"]
    enc = nn.ModuleDict({m: nn.Linear(5, 4) for m in names})
    fusion = nn.Linear(8, 3)
    x = {m: torch.randn(6, 5) for m in names}
    y = torch.arange(6) % 3
    present = {
        "text": torch.ones(6, dtype=torch.bool),
        "audio": torch.tensor([1, 1, 1, 1, 0, 0]).bool(),
    }
    feats = {m: enc[m](x[m]) for m in names}
    nan_rows = torch.where(present["audio"].unsqueeze(1), 0.0, float("nan"))
    feats["audio"] = feats["audio"] + nan_rows
    fused = fusion(torch.cat([feats["text"], torch.nan_to_num(feats["audio"])], 1))
    out = _out(feats, y, fused=fused, present=present)
    methods = [
        PMR(dict.fromkeys(names, 4), 3),
        CGGM(dict(enc), {m: nn.Linear(4, 3) for m in names}, lam=0.0),
        MLA(names, 4, 3),
    ]
    for step, method in enumerate(methods):
        enc.zero_grad()
        o = out._replace(step=1)  # MLA trains audio at step 1
        losses = method.losses(o, {})
        total = combine_losses(losses)
        assert torch.isfinite(total), type(method).__name__
        total.backward(retain_graph=True)
        for p in [*enc.parameters(), *method.parameters()]:
            assert p.grad is None or bool(torch.isfinite(p.grad).all()), (step, type(method))


# =============================================================================================
# InfoReg
# =============================================================================================


def official_inforeg_k(audio_trace_list, epoch):
    """Transcription of the start of ``main.py::train_epoch``."""
    if epoch == 0:
        return 1
    tr1 = sum(audio_trace_list[-10:]) / 10
    tr2 = sum(audio_trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def official_inforeg_step(
    audio_net, visual_net, global_audio, global_visual, out_a, out_v, label, k
):
    """Transcription of the per-step rule (score, beta, grad += beta (theta - theta_global))."""
    softmax = nn.Softmax(dim=1)
    tanh = nn.Tanh()
    score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
    score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
    if (score_a > score_v) and k > 0.04:
        gap = tanh(score_a - score_v)
        beta = 0.95 * torch.exp(gap)
        beta2 = 0
    elif (score_v < score_a) and k > 0.04:  # the released (unreachable) second branch
        gap = tanh(score_v - score_a)
        beta2 = 0.1 * torch.exp(gap)
        beta = 0
    else:
        beta = 0
        beta2 = 0
    for p, g in zip(audio_net.parameters(), global_audio.parameters()):
        p.grad += beta * (p - g)
    for p, g in zip(visual_net.parameters(), global_visual.parameters()):
        p.grad += beta2 * (p - g)
    fim = 0.0
    for p in audio_net.parameters():
        if p.ndim >= 2:
            fim += float((p.grad * p.grad).mean().detach())
    return float(torch.as_tensor(beta).detach()), float(beta2), fim


def _inforeg_pair(dominant):
    audio, visual = nn.Linear(3, 3).to(DT), nn.Linear(3, 3).to(DT)
    x, y = torch.randn(16, 3, dtype=DT), torch.arange(16) % 3
    with torch.no_grad():  # make `dominant` the better-scoring modality
        good = audio if dominant == "audio" else visual
        good.weight.copy_(torch.eye(3, dtype=DT) * 4)
        good.bias.zero_()
        x = torch.nn.functional.one_hot(y, 3).to(DT) + 0.1 * x
    return audio, visual, x, y


@pytest.mark.parity
def test_inforeg_parity_step_rule_and_trace():
    import copy

    audio, visual, x, y = _inforeg_pair("audio")
    reg = InfoReg({"audio": audio, "visual": visual})
    g_audio, g_visual = copy.deepcopy(audio), copy.deepcopy(visual)
    ref_a, ref_v = copy.deepcopy(audio), copy.deepcopy(visual)
    ref_trace = 0.0
    opt = torch.optim.SGD([*audio.parameters(), *visual.parameters()], lr=0.05)
    ref_opt = torch.optim.SGD([*ref_a.parameters(), *ref_v.parameters()], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        ua, uv = audio(x), visual(x)
        ra, rv = ref_a(x), ref_v(x)
        out = _out({"audio": ua, "visual": uv}, y, unimodal={"audio": ua, "visual": uv}, step=step)
        reg.losses(out, {})
        (task_loss(ua, y, "classification") + task_loss(uv, y, "classification")).backward()
        (task_loss(ra, y, "classification") + task_loss(rv, y, "classification")).backward()
        with reg.around_step(out, opt):
            opt.step()
        beta, beta2, fim = official_inforeg_step(ref_a, ref_v, g_audio, g_visual, ra, rv, y, 1)
        ref_opt.step()
        ref_trace += fim
        assert float(reg.coefficients[0]) == pytest.approx(beta) and beta > 0
        assert float(reg.coefficients[1]) == beta2 == 0
        for p, q in zip(
            [*audio.parameters(), *visual.parameters()], [*ref_a.parameters(), *ref_v.parameters()]
        ):
            torch.testing.assert_close(p, q)
    assert float(reg.epoch_trace[0]) == pytest.approx(ref_trace)


@pytest.mark.parity
def test_inforeg_parity_window_k():
    traces = [float(t) for t in torch.rand(14) + 0.5]
    reg = InfoReg({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    assert reg.k.tolist() == [1.0, 1.0]
    for e, t in enumerate(traces):
        with torch.no_grad():
            reg.epoch_trace.fill_(t)
        reg.epoch_end(e)
        ref = official_inforeg_k(traces[: e + 1], e + 1)
        assert float(reg.k[0]) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ModbalanceError, match="window"):
        inforeg_window_k(torch.zeros(5), 1, window=10)


def test_inforeg_regulates_visual_too_and_three_modalities():
    """Pins the documented fix: the released code can never regulate the visual encoder."""
    audio, visual, x, y = _inforeg_pair("visual")
    reg = InfoReg({"audio": audio, "visual": visual})
    uni = {"audio": audio(x), "visual": visual(x)}
    reg.losses(_out(uni, y, unimodal=uni), {})
    sum(task_loss(u, y, "classification") for u in uni.values()).backward()
    opt = torch.optim.SGD([*audio.parameters(), *visual.parameters()], lr=0)
    with reg.around_step(_out(uni, y, unimodal=uni), opt):
        pass
    assert float(reg.coefficients[1]) > 0 and float(reg.coefficients[0]) == 0
    assert inforeg_beta(torch.tensor([5.0, 1.0, 1.0]), torch.ones(3)).gt(0).tolist() == [
        True,
        False,
        False,
    ]
    assert inforeg_beta(torch.tensor([5.0, 1.0]), torch.tensor([0.01, 1.0])).tolist() == [0.0, 0.0]


def test_inforeg_pull_carries_gradient_toward_anchor_regression_and_state():
    enc = nn.ModuleDict({m: nn.Linear(3, 1) for m in ("text", "audio")})
    reg = InfoReg(dict(enc))
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8)
    for step in range(2):
        opt.zero_grad()
        uni = {m: enc[m](x)[:, 0] for m in enc}
        out = _out(uni, y, task="regression", unimodal=uni, step=step)
        reg.losses(out, {})
        sum(task_loss(u, y, "regression") for u in uni.values()).backward()
        before = {m: [p.grad.clone() for p in enc[m].parameters()] for m in enc}
        with reg.around_step(out, opt):
            opt.step()
    i = int(reg.coefficients.argmax())
    assert float(reg.coefficients[i]) > 0  # the better regressor is pulled back
    name = reg.modalities[i]
    anchors = [getattr(reg, f"anchor_{i}_{j}") for j in range(2)]
    assert not torch.equal(anchors[0], enc[name].weight)
    del before
    reg.epoch_end(0)
    other = InfoReg(dict(enc))
    other.load_state_dict(reg.state_dict())
    for key, val in reg.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], val, equal_nan=True)
    with pytest.raises(ModbalanceError, match="scale"):
        InfoReg(dict(enc), scale=0)
    with pytest.raises(ModbalanceError, match="window"):
        InfoReg(dict(enc), window=0)
    with pytest.raises(ModbalanceError, match="unimodal"):
        InfoReg(dict(enc)).losses(_out(uni, y, task="regression"), {})
    with pytest.raises(ModbalanceError, match="unimodal"):  # around_step scores from `out`
        with InfoReg(dict(enc)).around_step(_out(uni, y, task="regression"), opt):
            pass
    # no hidden state between losses() and around_step(): the same scores without losses()
    a, b = InfoReg(dict(enc)), InfoReg(dict(enc))
    a.losses(out, {})
    for method in (a, b):
        with method.around_step(out, torch.optim.SGD(enc.parameters(), lr=0.0)):
            pass
    assert torch.equal(a.scores, b.scores) and torch.equal(a.coefficients, b.coefficients)


@pytest.mark.parity
def test_inforeg_parity_beta_branches():
    tanh = nn.Tanh()
    for score_a, score_v, k in [
        (0.7, 0.3, 0.5),
        (3.2, 2.9, 0.05),
        (0.3, 0.7, 0.5),
        (0.9, 0.2, 0.01),
    ]:
        score_a, score_v = torch.tensor(score_a), torch.tensor(score_v)
        if (score_a > score_v) and k > 0.04:
            beta = 0.95 * torch.exp(tanh(score_a - score_v))
        else:
            beta = torch.tensor(0.0)
        ours = inforeg_beta(torch.stack([score_a, score_v]), torch.tensor([k, k]))
        torch.testing.assert_close(ours[0], beta)


def test_bf16_features_from_autocast_work_with_float32_methods():
    names = ["text", "audio"]
    enc = nn.ModuleDict({m: nn.Linear(5, 4) for m in names})
    fusion = nn.Linear(8, 3)
    x = {m: torch.randn(6, 5) for m in names}
    y = torch.arange(6) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = {m: enc[m](x[m]) for m in names}
        fused = fusion(torch.cat([feats[m] for m in names], 1))
    assert feats["text"].dtype == torch.bfloat16
    out = _out(feats, y, fused=fused, unimodal=feats)
    methods = [
        PMR(dict.fromkeys(names, 4), 3),
        CGGM(dict(enc), {m: nn.Linear(4, 3) for m in names}),
        MLA(names, 4, 3),
        InfoReg(dict(enc)),
    ]
    for method in methods:
        enc.zero_grad()
        losses = method.losses(out, {"task": task_loss(fused, y, "classification")})
        total = combine_losses(losses)
        assert torch.isfinite(total), type(method).__name__
        total.backward(retain_graph=True)
        with method.around_step(out, torch.optim.SGD(enc.parameters(), lr=0.0)):
            pass
