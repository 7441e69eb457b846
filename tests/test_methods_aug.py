"""AUG: parity with the released code, the step mapping, assignment, masks, errors, state.

The parity tests compare our method with a transcription of the authors' code
(njustkmg/NeurIPS25-AUG: ``model/AudioVideo.py``'s ``AVGBShareClassifier`` — ``classfier`` and
``add_layer`` — and ``train_CREMAD.py``'s ``train_audio_video``, ``val`` and main loop), written
out below in plain torch, float64. The released model has two modalities (audio, video), one-hot
labels and cross-entropy; its ResNet encoders are replaced by small linear encoders. Regression
and M = 3 are ours: their references are the documented rules written out by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance import ModbalanceError
from modbalance.balancing import StepOutput, balanced_step, combine_losses
from modbalance.methods.aug import AUG, aug_assignment, aug_boosting_loss

DTYPE = torch.float64
DIM, HIDDEN, CLASSES = 4, 5, 3
INPUTS = {"audio": 3, "video": 6}


# ==========================================================================================
# The released code, transcribed (classifier part of AVGBShareClassifier; training loop rules)
# ==========================================================================================


class Released(nn.Module):
    """``AVGBShareClassifier`` without its ResNet encoders: ``classfier`` and ``add_layer``."""

    def __init__(self, dim, hidden, num_class):
        super().__init__()
        self.embedding_a = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.embedding_v = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.fc_out = nn.Linear(hidden, num_class)
        self.additional_layers_a = nn.ModuleList()
        self.additional_layers_v = nn.ModuleList()
        self.relu = nn.ReLU()

    def add_layer(self, layer, is_a=True):
        # the released add_layer draws a fresh xavier-normal Linear(512, 256); the test hands in
        # the initialised layer so that both sides start from the same numbers
        (self.additional_layers_a if is_a else self.additional_layers_v).append(layer)

    def classfier(self, x, is_a=True, last_in_previous=False):
        emb = self.embedding_a if is_a else self.embedding_v
        extra = self.additional_layers_a if is_a else self.additional_layers_v
        feature = self.fc_out(emb(x))
        o_fea, add_fea = feature, None
        for i, layer in enumerate(extra, start=1):
            add_fea = self.fc_out(self.relu(layer(x)))
            feature = feature + add_fea
            if i < len(extra) or last_in_previous:  # perturbation: S' includes the new learner
                o_fea = feature
        return feature, o_fea, add_fea


def released_loss(out, o_fea, add_fea, y, half=0.5, detach=True):
    """``train_audio_video``'s per-modality loss (``y`` one-hot)."""
    criterion = nn.CrossEntropyLoss(reduction="none")
    if add_fea is None:
        return criterion(out, y).mean()
    kl = y * (o_fea.detach() if detach else o_fea).softmax(1)
    return (
        criterion(out, y).mean()
        + criterion(o_fea, y).mean()
        + criterion(add_fea, y).mean()
        - half * criterion(add_fea, kl).mean()
    )


def released_score(out, y):
    """``sum([F.softmax(out)[i][torch.argmax(y[i])] for i in range(out.size(0))])``."""
    return sum(F.softmax(out, dim=1)[i][torch.argmax(y[i])] for i in range(out.size(0)))


def released_check(epoch, epochs, ratio, lam=1.0):
    """The main loop's assignment: ``'v'``, ``'a'`` or ``None`` after ``epoch``."""
    check = int(epochs / 10) if epochs > 10 else 1
    if (epoch + 1) % check == 0 or epoch == 0:
        if ratio > lam + 0.01:
            return "v"
        if ratio < lam - 0.01:
            return "a"
    return None


def released_train_batch(rel, enc, x, y, optimizer, **perturb):
    """Two optimizer steps, audio then video, through the shared ``fc_out``."""
    optimizer.zero_grad()
    o_a, o_v = enc["audio"](x["audio"]), enc["video"](x["video"])
    out_a, o_fea, add_fea = rel.classfier(o_a, is_a=True)
    loss_a = released_loss(out_a, o_fea, add_fea, y, **perturb)
    loss_a.backward()
    optimizer.step()
    optimizer.zero_grad()
    out_v, o_fea, add_fea = rel.classfier(o_v, is_a=False)
    loss_v = released_loss(out_v, o_fea, add_fea, y, **perturb)
    loss_v.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss_a, loss_v


# ==========================================================================================
# helpers
# ==========================================================================================


def make_data(dims, n, task, seed=0, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=g, dtype=DTYPE) for m, d in dims.items()}
    if task == "regression":
        y = torch.randn(n, generator=g, dtype=DTYPE)
    else:
        y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_encoders(dims, seed=1):
    torch.manual_seed(seed)
    return nn.ModuleDict({m: nn.Linear(d, DIM) for m, d in dims.items()}).to(DTYPE)


def set_counts(aug, counts):
    """Activate ``counts`` learners per modality (through ``load_state_dict``)."""
    state = aug.state_dict()
    state["coefficients"] = torch.tensor(counts, dtype=state["coefficients"].dtype)
    aug.load_state_dict(state)


def make_aug(modalities=tuple(INPUTS), task="classification", counts=None, **options):
    options.setdefault("max_learners", 4)
    outputs = 1 if task == "regression" else CLASSES
    aug = AUG(list(modalities), DIM, outputs, hidden=HIDDEN, seed=3, **options).to(DTYPE)
    if counts is not None:
        set_counts(aug, counts)
    return aug


def released_from(aug, counts):
    """The released model holding AUG's numbers: embeddings = learner 0, added = 1..K-1."""
    rel = Released(DIM, HIDDEN, CLASSES).to(DTYPE)
    with torch.no_grad():
        for i, emb in enumerate((rel.embedding_a, rel.embedding_v)):
            emb[0].load_state_dict(aug.learners[i][0].state_dict())
        rel.fc_out.load_state_dict(aug.classifier.state_dict())
    for i, is_a in ((0, True), (1, False)):
        for k in range(1, counts[i]):
            layer = copy.deepcopy(aug.learners[i][k])
            layer.requires_grad_(True)
            rel.add_layer(layer, is_a=is_a)
    return rel


def pairs(aug, rel, enc_ours, enc_rel):
    """``(name, our parameter, released parameter)`` for every parameter both sides have."""
    out = [
        (f"enc.{k}", p, dict(enc_rel.named_parameters())[k]) for k, p in enc_ours.named_parameters()
    ]
    out += [
        (f"fc_out.{k}", p, getattr(rel.fc_out, k)) for k, p in aug.classifier.named_parameters()
    ]
    for i, (emb, extra) in enumerate(
        ((rel.embedding_a, rel.additional_layers_a), (rel.embedding_v, rel.additional_layers_v))
    ):
        layers = [emb[0], *extra]
        for k, layer in enumerate(layers):
            for name in ("weight", "bias"):
                ours = getattr(aug.learners[i][k], name)
                out.append((f"learner{i}.{k}.{name}", ours, getattr(layer, name)))
    return out


def step_output(feats, y, task="classification", present=None, phase=2):
    n = y.shape[0]
    if present is None:
        present = {m: torch.ones(n, dtype=torch.bool) for m in feats}
    return StepOutput(feats, {}, None, present, y, task, phase=phase)


def grad_of(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


COUNTS = [(1, 1), (2, 1), (1, 3), (3, 2), (4, 4)]


# ==========================================================================================
# parity: loss values and gradients
# ==========================================================================================


def _both_sides(counts, seed=0, train_added=True):
    aug = make_aug(counts=counts, train_added=train_added)
    enc_ours = make_encoders(INPUTS)
    enc_rel = copy.deepcopy(enc_ours)
    rel = released_from(aug, counts)
    x, y = make_data(INPUTS, 10, "classification", seed)
    return aug, rel, enc_ours, enc_rel, x, y


def _ours_terms(aug, enc, x, y):
    feats = {m: enc[m](x[m]) for m in enc}
    return aug.losses(step_output(feats, y), {})


@pytest.mark.parity
@pytest.mark.parametrize("counts", COUNTS)
def test_losses_and_gradients_match_the_released_code(counts):
    aug, rel, enc_ours, enc_rel, x, y = _both_sides(counts)
    terms = _ours_terms(aug, enc_ours, x, y)
    combine_losses(terms).backward()
    onehot = F.one_hot(y, CLASSES).to(DTYPE)
    o_a, o_v = enc_rel["audio"](x["audio"]), enc_rel["video"](x["video"])
    loss_a = released_loss(*rel.classfier(o_a, is_a=True), onehot)
    loss_v = released_loss(*rel.classfier(o_v, is_a=False), onehot)
    (loss_a + loss_v).backward()  # both gradients at the same parameters
    torch.testing.assert_close(terms["aug_audio"], loss_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["aug_video"], loss_v, rtol=1e-12, atol=1e-12)
    for name, ours, theirs in pairs(aug, rel, enc_ours, enc_rel):
        torch.testing.assert_close(grad_of(ours), grad_of(theirs), rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parity
@pytest.mark.parametrize(
    "perturb",
    [{"half": 0.2}, {"detach": False}, {"last_in_previous": True}],
    ids=["gamma", "no-detach", "previous-sum"],
)
def test_the_loss_parity_fails_when_the_rule_is_perturbed(perturb):
    aug, rel, enc_ours, enc_rel, x, y = _both_sides((3, 2))
    terms = _ours_terms(aug, enc_ours, x, y)
    combine_losses(terms).backward()
    onehot = F.one_hot(y, CLASSES).to(DTYPE)
    o_a, o_v = enc_rel["audio"](x["audio"]), enc_rel["video"](x["video"])
    last = perturb.pop("last_in_previous", False)
    total = released_loss(*rel.classfier(o_a, True, last), onehot, **perturb) + released_loss(
        *rel.classfier(o_v, False, last), onehot, **perturb
    )
    total.backward()
    same_value = torch.allclose(combine_losses(terms), total.detach(), rtol=1e-9, atol=1e-12)
    same_grads = all(
        torch.allclose(grad_of(a), grad_of(b), rtol=1e-9, atol=1e-12)
        for _, a, b in pairs(aug, rel, enc_ours, enc_rel)
    )
    assert not (same_value and same_grads)


# ==========================================================================================
# parity: the step (one step instead of two) and the frozen added learners
# ==========================================================================================


def _one_step_each(counts, train_added):
    aug, rel, enc_ours, enc_rel, x, y = _both_sides(counts, seed=4, train_added=train_added)
    lr = 0.5
    simultaneous = {}
    probe_aug, probe_enc = copy.deepcopy(aug), copy.deepcopy(enc_ours)
    combine_losses(_ours_terms(probe_aug, probe_enc, x, y)).backward()
    for (name, p, _), (_, q, _) in zip(
        pairs(aug, rel, enc_ours, enc_rel), pairs(probe_aug, rel, probe_enc, enc_rel)
    ):
        simultaneous[name] = p.detach() - lr * grad_of(q)
    ours_opt = torch.optim.SGD([*enc_ours.parameters(), *aug.parameters()], lr=lr)
    feats = {m: enc_ours[m](x[m]) for m in enc_ours}
    balanced_step(step_output(feats, y), {}, [aug], ours_opt)
    # the released optimizer is built before add_layer: the added layers are not in it
    released_params = [*enc_rel.parameters(), *rel.embedding_a.parameters()]
    released_params += [*rel.embedding_v.parameters(), *rel.fc_out.parameters()]
    if train_added:  # the paper's method: the added learners train as well
        released_params += [*rel.additional_layers_a.parameters()]
        released_params += [*rel.additional_layers_v.parameters()]
    rel_opt = torch.optim.SGD(released_params, lr=lr)
    released_train_batch(rel, enc_rel, x, F.one_hot(y, CLASSES).to(DTYPE), rel_opt)
    return aug, rel, enc_ours, enc_rel, simultaneous


@pytest.mark.parity
@pytest.mark.parametrize("train_added", [True, False])
@pytest.mark.parametrize("counts", [(1, 1), (3, 2)])
def test_one_step_matches_the_released_audio_update_and_sums_the_shared_gradient(
    counts, train_added
):
    aug, rel, enc_ours, enc_rel, simultaneous = _one_step_each(counts, train_added)
    for name, ours, theirs in pairs(aug, rel, enc_ours, enc_rel):
        # ours is the step with both modalities' gradients at the same parameters
        torch.testing.assert_close(ours.detach(), simultaneous[name], rtol=1e-10, atol=1e-12)
        audio_side = name.startswith(("enc.audio", "learner0."))
        if audio_side:  # the audio update comes first in the released loop: identical
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)
        if name.startswith("learner") and name.split(".")[1] != "0" and not train_added:
            assert not ours.requires_grad, name  # released: never in the optimizer
            assert torch.equal(ours, theirs), name
    # the shared classifier moved by the sum of both gradients, the released one sequentially
    assert not torch.allclose(aug.classifier.weight, rel.fc_out.weight, rtol=1e-10, atol=1e-12)


# ==========================================================================================
# parity: assignment over epochs, and inference
# ==========================================================================================


def _released_epochs(aug, enc, data, epochs, lam):
    """The main loop's score sums, ratios and add_layer calls (no training: scores only)."""
    rel = released_from(aug, (1, 1))
    counts, ratios, added = [1, 1], [], []
    for epoch in range(epochs):
        score_a = score_v = 0.0
        with torch.no_grad():
            for x, y in data[epoch]:
                onehot = F.one_hot(y, CLASSES).to(DTYPE)
                score_a += released_score(rel.classfier(enc["audio"](x["audio"]), True)[0], onehot)
                score_v += released_score(rel.classfier(enc["video"](x["video"]), False)[0], onehot)
        ratio = float(score_a / score_v)
        ratios.append(ratio)
        which = released_check(epoch, epochs, ratio, lam)
        if which is not None:
            i = 0 if which == "a" else 1
            layer = copy.deepcopy(aug.learners[i][counts[i]])
            rel.add_layer(layer, is_a=which == "a")
            counts[i] += 1
        added.append(which)
    return ratios, added


def _our_epochs(aug, enc, data, epochs):
    ratios, added = [], []
    for epoch in range(epochs):
        before = aug.coefficients.clone()
        with torch.no_grad():
            for x, y in data[epoch]:
                aug.losses(step_output({m: enc[m](x[m]) for m in enc}, y), {})
        aug.epoch_end(epoch)
        ratios.append(float(aug.last_ratio))
        diff = (aug.coefficients - before).tolist()
        added.append("a" if diff[0] else "v" if diff[1] else None)
    return ratios, added


@pytest.mark.parity
@pytest.mark.parametrize(("epochs", "lam"), [(8, 1.0), (25, 1.0), (12, 1.3)])
def test_assignment_matches_the_released_main_loop(epochs, lam):
    every = int(epochs / 10) if epochs > 10 else 1
    aug = make_aug(counts=(1, 1), max_learners=epochs + 1, every=every, lam=lam)
    enc = make_encoders(INPUTS)
    data = [
        [make_data(INPUTS, 7, "classification", seed=100 * e + b) for b in range(3)]
        for e in range(epochs)
    ]
    ref_ratios, ref_added = _released_epochs(aug, enc, data, epochs, lam)
    ratios, added = _our_epochs(aug, enc, data, epochs)
    assert added == ref_added
    if lam == 1.0:  # both branches of the rule were exercised
        assert {"a", "v"} <= set(ref_added)
    assert set(ref_added) - {None}
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(ref_ratios), rtol=1e-6, atol=0)


@pytest.mark.parity
def test_the_assignment_parity_fails_when_the_rule_is_perturbed():
    epochs = 8
    aug = make_aug(counts=(1, 1), max_learners=epochs + 1)
    enc = make_encoders(INPUTS)
    data = [[make_data(INPUTS, 7, "classification", seed=100 * e)] for e in range(epochs)]
    _, ref_added = _released_epochs(copy.deepcopy(aug), enc, data, epochs, 1.0)
    inverted = [{"a": "v", "v": "a"}.get(a) for a in ref_added]  # add to the stronger one
    _, added = _our_epochs(aug, enc, data, epochs)
    assert added == ref_added and added != inverted


@pytest.mark.parity
@pytest.mark.parametrize("counts", [(1, 1), (3, 2)])
def test_predict_is_the_released_merge(counts):
    aug = make_aug(counts=counts, weights=(0.4, 0.6))
    rel = released_from(aug, counts)
    enc = make_encoders(INPUTS)
    x, _ = make_data(INPUTS, 9, "classification")
    feats = {m: enc[m](x[m]).detach() for m in enc}
    with torch.no_grad():
        out_a = rel.classfier(feats["audio"], is_a=True)[0]
        out_v = rel.classfier(feats["video"], is_a=False)[0]
        expected = 0.4 * out_a + (1 - 0.4) * out_v  # merge_alpha = 0.4
        ours = aug.predict(feats)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(make_aug(counts=counts).predict(feats), expected)  # uniform


# ==========================================================================================
# the rule's pieces: boosting loss, assignment, schedule
# ==========================================================================================


def test_boosting_loss_regression_is_residual_boosting_by_hand():
    g = torch.Generator().manual_seed(0)
    prev, new, y = (torch.randn(6, generator=g, dtype=DTYPE) for _ in range(3))
    prev.requires_grad_(True)
    new.requires_grad_(True)
    total = prev + new
    loss = aug_boosting_loss(total, y, "regression", prev, new, gamma=0.5)
    s = torch.exp(-(prev.detach() - y).abs())
    hand = (
        (total - y).abs().mean()
        + (prev - y).abs().mean()
        + ((1 - 0.5 * s) * (new - (y - prev.detach())).abs()).mean()
    )
    torch.testing.assert_close(loss, hand)
    one = aug_boosting_loss(total, y, "regression")
    torch.testing.assert_close(one, (total - y).abs().mean())


def test_boosting_weight_does_not_reach_the_previous_learners():
    """The sample weight uses sg(S'): gamma changes the newest learner's gradient only."""
    grads = {}
    for gamma in (0.0, 0.5):
        torch.manual_seed(0)
        prev = torch.randn(5, CLASSES, dtype=DTYPE, requires_grad=True)
        new = torch.randn(5, CLASSES, dtype=DTYPE, requires_grad=True)
        y = torch.tensor([0, 1, 2, 0, 1])
        aug_boosting_loss(prev + new, y, "classification", prev, new, gamma=gamma).backward()
        grads[gamma] = (prev.grad.clone(), new.grad.clone())
    torch.testing.assert_close(grads[0.0][0], grads[0.5][0])
    assert not torch.allclose(grads[0.0][1], grads[0.5][1])


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(0.5, 2.0), st.floats(0.0, 0.1))
def test_two_modality_assignment_is_the_released_rule(s0, s1, lam, margin):
    which, ratio = aug_assignment([s0, s1], lam, margin)
    ratio_ref = s0 / s1
    expected = 1 if ratio_ref > lam + margin else 0 if ratio_ref < lam - margin else None
    assert which == expected and ratio == ratio_ref


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=5), st.floats(0.1, 10.0))
def test_assignment_beyond_two_adds_to_the_weakest_and_ignores_scale(scores, scale):
    which, _ = aug_assignment(scores)
    weakest = min(range(len(scores)), key=lambda k: scores[k])
    gap = max(scores) / min(scores)
    if gap > 1.0 / 0.99 + 1e-9:
        assert which == weakest
    if gap < 1.01 - 1e-9:
        assert which is None
    scaled, _ = aug_assignment([s * scale for s in scores])
    if abs(gap - 1.01) > 1e-6 and abs(gap - 1 / 0.99) > 1e-6:
        assert scaled == which


def test_assignment_skips_unseen_modalities_and_zero_scores():
    assert aug_assignment([math.nan, 0.4, 0.8]) == (1, 0.5)
    which, ratio = aug_assignment([0.5, math.nan])
    assert which is None and math.isnan(ratio)
    assert aug_assignment([0.5, 0.0]) == (1, math.inf)
    which, ratio = aug_assignment([0.0, 0.0])
    assert which is None and math.isnan(ratio)


def test_check_schedule_is_the_released_one():
    aug = make_aug(every=20)
    assert [e for e in range(60) if aug.checks_at(e)] == [0, 19, 39, 59]
    assert all(make_aug(every=1).checks_at(e) for e in range(5))


def test_epoch_end_caps_resets_and_records():
    aug = make_aug(max_learners=2)
    aug.score_sum.copy_(torch.tensor([9.0, 3.0], dtype=DTYPE))
    aug.score_count.copy_(torch.tensor([10.0, 10.0], dtype=DTYPE))
    aug.epoch_end(0)
    assert aug.coefficients.tolist() == [1.0, 2.0]
    assert aug.score_sum.tolist() == [0.0, 0.0] and aug.score_count.tolist() == [0.0, 0.0]
    assert aug.last_score.tolist() == pytest.approx([0.9, 0.3])
    assert float(aug.last_ratio) == pytest.approx(3.0)
    aug.score_sum.copy_(torch.tensor([9.0, 3.0], dtype=DTYPE))
    aug.score_count.copy_(torch.tensor([10.0, 10.0], dtype=DTYPE))
    aug.epoch_end(1)  # video is at max_learners: nothing more
    assert aug.coefficients.tolist() == [1.0, 2.0]
    aug.epoch_end(2)  # nothing recorded: no decision
    assert aug.coefficients.tolist() == [1.0, 2.0] and math.isnan(float(aug.last_ratio))
    summary = aug.summary()
    assert summary["coefficient_audio"] == 1.0 and summary["coefficient_video"] == 2.0
    assert set(summary) == {
        "coefficient_audio",
        "coefficient_video",
        "score_audio",
        "score_video",
        "ratio",
    }
    assert all(isinstance(v, float) for v in summary.values())


def test_no_assignment_between_checks():
    aug = make_aug(every=3)
    for epoch, expected in ((0, 2.0), (1, 2.0), (2, 3.0)):
        aug.score_sum.copy_(torch.tensor([9.0, 3.0], dtype=DTYPE))
        aug.score_count.copy_(torch.tensor([10.0, 10.0], dtype=DTYPE))
        aug.epoch_end(epoch)
        assert float(aug.coefficients[1]) == expected, epoch


# ==========================================================================================
# gradient routing, M = 3, regression, masks, terms
# ==========================================================================================


DIMS3 = {"text": 3, "audio": 2, "video": 4}


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_term_reaches_its_modality_its_active_learners_and_the_classifier(task):
    names = tuple(DIMS3)
    aug = make_aug(names, task, counts=(2, 1, 3))
    enc = make_encoders(DIMS3)
    x, y = make_data(DIMS3, 8, task)
    for m in names:
        aug.zero_grad(set_to_none=True)
        enc.zero_grad(set_to_none=True)
        feats = {k: enc[k](x[k]) for k in names}
        terms = aug.losses(step_output(feats, y, task), {})
        assert sorted(terms) == sorted(f"aug_{k}" for k in names)
        terms[f"aug_{m}"].backward()
        assert aug.classifier.weight.grad.abs().sum() > 0
        for i, k in enumerate(names):
            has = enc[k].weight.grad is not None and enc[k].weight.grad.abs().sum() > 0
            assert has == (k == m), (m, k)
            for idx, learner in enumerate(aug.learners[i]):
                active = idx < int(aug.coefficients[i])
                got = learner.weight.grad is not None and learner.weight.grad.abs().sum() > 0
                assert got == (active and k == m), (m, k, idx)
                if not active:
                    assert learner.weight.grad is None  # never run: no gradient at all


def test_frozen_added_learners_pass_gradient_to_the_encoder_only():
    enc = make_encoders(INPUTS)
    x, y = make_data(INPUTS, 8, "classification")
    aug = make_aug(counts=(3, 1), train_added=False)
    feats = {m: enc[m](x[m]) for m in enc}
    combine_losses(aug.losses(step_output(feats, y), {})).backward()
    assert aug.learners[0][0].weight.grad is not None
    assert all(aug.learners[0][k].weight.grad is None for k in (1, 2))
    base = make_aug(counts=(1, 1), train_added=False)
    enc_b = copy.deepcopy(enc)
    enc_b.zero_grad(set_to_none=True)
    feats = {m: enc_b[m](x[m]) for m in enc_b}
    combine_losses(base.losses(step_output(feats, y), {})).backward()
    assert not torch.allclose(enc["audio"].weight.grad, enc_b["audio"].weight.grad)


def test_the_fused_task_term_is_dropped_unless_kept():
    enc = make_encoders(INPUTS)
    head = nn.Linear(2 * DIM, CLASSES).to(DTYPE)
    x, y = make_data(INPUTS, 8, "classification")
    feats = {m: enc[m](x[m]) for m in enc}
    fused = head(torch.cat([feats["audio"], feats["video"]], 1))
    base = {
        "task": F.cross_entropy(fused, y),
        "readout": fused.sum() * 0,
        "calibration": fused.mean(),
    }
    terms = make_aug().losses(step_output(feats, y), base)
    assert sorted(terms) == ["aug_audio", "aug_video", "readout"]
    combine_losses(terms).backward()
    assert head.weight.grad is None or not head.weight.grad.abs().sum() > 0
    kept = make_aug(keep=("task",)).losses(step_output(feats, y), base)
    assert sorted(kept) == ["aug_audio", "aug_video", "task"]
    assert kept["task"] is base["task"]


def test_other_phases_are_left_alone():
    aug = make_aug(phases=(2,))
    enc = make_encoders(INPUTS)
    x, y = make_data(INPUTS, 4, "classification")
    feats = {m: enc[m](x[m]) for m in enc}
    base = {"unimodal": torch.tensor(1.0)}
    assert aug.losses(step_output(feats, y, phase=1), base) == base
    assert aug.score_count.sum() == 0
    assert AUG.phases == (1, 2) and make_aug().phases == (1, 2)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_absent_samples_change_nothing(task):
    names = tuple(DIMS3)
    aug = make_aug(names, task, counts=(2, 2, 1))
    enc = make_encoders(DIMS3)
    x, y = make_data(DIMS3, 8, task)
    present = {m: torch.ones(8, dtype=torch.bool) for m in names}
    present["audio"] = torch.tensor([True, False, True, True, False, True, True, True])
    results = []
    for fill in (0.0, math.nan):
        aug.zero_grad(set_to_none=True)
        enc.zero_grad(set_to_none=True)
        feats = {m: enc[m](x[m]) for m in names}
        absent = ~present["audio"]
        feats["audio"] = torch.where(absent[:, None], fill, feats["audio"])
        terms = aug.losses(step_output(feats, y, task, present), {})
        combine_losses(terms).backward()
        results.append((terms["aug_audio"].detach(), aug.learners[1][0].weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    # the audio term is the loss over the present samples only
    keep = present["audio"]
    feats = {m: enc[m](x[m]) for m in names}
    sub = aug.outputs(1, feats["audio"][keep])
    hand = aug_boosting_loss(*sub[:1], y[keep], task, *sub[1:])
    torch.testing.assert_close(results[0][0], hand.detach())
    assert aug.score_count.tolist() == [16.0, 12.0, 16.0]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_training_scores_are_the_released_score_or_exp_minus_error(task):
    aug = make_aug(task=task, counts=(2, 1))
    enc = make_encoders(INPUTS)
    x, y = make_data(INPUTS, 8, task)
    feats = {m: enc[m](x[m]).detach() for m in enc}
    aug.losses(step_output(feats, y, task), {})
    for i, m in enumerate(INPUTS):
        total = aug.outputs(i, feats[m])[0]
        if task == "regression":
            expected = torch.exp(-(total - y).abs()).sum()
        else:
            expected = F.softmax(total, 1)[torch.arange(8), y].sum()
        torch.testing.assert_close(aug.score_sum[i], expected.detach())


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predict_weights_the_present_modalities(task):
    names = tuple(DIMS3)
    aug = make_aug(names, task, counts=(1, 2, 3), weights={"text": 1, "audio": 2, "video": 1})
    enc = make_encoders(DIMS3)
    x, _ = make_data(DIMS3, 5, task)
    feats = {m: enc[m](x[m]).detach() for m in names}
    present = {
        "text": torch.tensor([True, True, False, False, True]),
        "audio": torch.tensor([True, False, True, False, True]),
        "video": torch.tensor([True, True, True, False, False]),
    }
    pred = aug.predict(feats, present)
    outs = [aug.outputs(i, feats[m])[0].detach() for i, m in enumerate(names)]
    w = torch.tensor([0.25, 0.5, 0.25], dtype=DTYPE)
    for n in range(5):
        here = [i for i, m in enumerate(names) if present[m][n]]
        if not here:
            assert torch.all(pred[n] == 0)
            continue
        hand = sum(w[i] * outs[i][n] for i in here) / sum(w[i] for i in here)
        torch.testing.assert_close(pred[n], hand)
    assert pred.shape == ((5,) if task == "regression" else (5, CLASSES))


# ==========================================================================================
# state, contract, the example's loop, host synchronisation
# ==========================================================================================


def test_state_dict_round_trip_restores_counts_and_learners():
    aug = make_aug(counts=(3, 2))
    aug.score_sum.fill_(2.0)
    aug.score_count.fill_(4.0)
    state = aug.state_dict()
    fresh = AUG(list(INPUTS), DIM, CLASSES, hidden=HIDDEN, seed=99).to(DTYPE)
    assert not torch.equal(fresh.classifier.weight, aug.classifier.weight)
    fresh.load_state_dict(state)
    assert fresh.coefficients.tolist() == [3.0, 2.0] and fresh.score_sum.tolist() == [2.0, 2.0]
    enc = make_encoders(INPUTS)
    x, y = make_data(INPUTS, 6, "classification")
    feats = {m: enc[m](x[m]).detach() for m in enc}
    torch.testing.assert_close(fresh.predict(feats), aug.predict(feats))
    a = aug.losses(step_output(feats, y), {})
    b = fresh.losses(step_output(feats, y), {})
    torch.testing.assert_close(combine_losses(a), combine_losses(b))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1.5, 1.0], "whole numbers"),
        ([5.0, 1.0], r"\[1, 4\]"),
        ([0.0, 1.0], "whole numbers in"),
    ],
)
def test_loading_invalid_counts_is_refused_before_copying(value, match):
    aug = make_aug()
    state = aug.state_dict()
    state["coefficients"] = torch.tensor(value, dtype=DTYPE)
    with pytest.raises(ModbalanceError, match=match):
        aug.load_state_dict(state)
    assert aug.coefficients.tolist() == [1.0, 1.0]


def test_loading_a_state_of_other_modalities_is_refused():
    state = make_aug().state_dict()
    other = AUG(["video", "audio"], DIM, CLASSES, hidden=HIDDEN).to(DTYPE)
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        other.load_state_dict(state)


def test_seeded_initialisation_and_coefficients_contract():
    a, b = make_aug(), make_aug()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all(torch.all(lin.bias == 0) for group in a.learners for lin in group)
    assert a.coefficients.shape == (2,) and a.coefficients.dtype == DTYPE
    assert len(list(a.parameters())) == 2 * (2 * 4) + 2
    assert "max_learners=4" in repr(a)


def test_around_step_leaves_gradients_alone_in_one_process():
    aug = make_aug()
    for p in aug.parameters():
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(aug.parameters(), lr=0.0)
    with aug.around_step(None, opt):
        pass
    assert all(torch.all(p.grad == 1) for p in aug.parameters())


def _example_parts(task):
    from examples.pase import PAPER_SWITCHES, PaSEConfig, build
    from examples.pase.model import PaSEModel

    dims = {"text": 12, "audio": 5, "vision": 6}
    extra = {"task": "classification", "num_outputs": 4, "num_classes": 4}
    cfg = PaSEConfig(
        modalities=tuple(dims),
        input_dims=dims,
        dim=8,
        heads=2,
        **PAPER_SWITCHES,
        **(extra if task == "classification" else {}),
    )
    torch.manual_seed(0)
    model = PaSEModel(cfg)
    aug = AUG(model.modalities, model.config.dim, model.config.num_outputs, max_learners=3)
    return build(cfg, model=model, methods=[aug])


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_train_step_in_the_example_does_not_synchronise(task):
    from test_host_sync import _assert_no_sync, count_syncs, make_batch

    parts = _example_parts(task)
    aug = parts.methods[0]
    set_counts(aug, [1, 3, 2])
    batch = make_batch(task, 4) if task == "classification" else make_batch()
    counter = count_syncs(parts, batch)
    _assert_no_sync(counter, f"AUG ({task})")
    assert aug.score_count.tolist() == [64.0, 64.0, 64.0]  # 4 steps of 16 samples
    # the example's optimizer holds the method's learners (added at build time)
    held = [p for g in parts.optimizer.param_groups for p in g["params"]]
    assert any(p is aug.learners[1][2].weight for p in held)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_the_example_trains_the_learners_and_predicts_with_the_ensemble(task):
    from test_host_sync import make_batch

    from examples.pase import train_step

    parts = _example_parts(task)
    aug = parts.methods[0]
    before = [p.detach().clone() for p in aug.learners[0][1].parameters()]
    first = aug.learners[0][0].weight.detach().clone()
    batch = make_batch(task, 4) if task == "classification" else make_batch()
    for _ in range(2):
        terms = train_step(parts, batch, 2)
    assert sorted(terms) == ["aug_audio", "aug_text", "aug_vision", "readout"]
    assert not torch.equal(first, aug.learners[0][0].weight)
    assert all(torch.equal(a, b) for a, b in zip(before, aug.learners[0][1].parameters()))
    aug.epoch_end(0)
    assert float(aug.coefficients.sum()) in (3.0, 4.0)
    parts.model.eval()
    with torch.no_grad():
        from examples.pase.data import to_device

        out = parts.model.predict(to_device(batch, parts.device))
        pred = aug.predict(out["features"], out["present"])
    assert pred.shape == out["fused"].shape


# ==========================================================================================
# errors
# ==========================================================================================


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modalities": ["audio"]}, ModbalanceError, "at least 2 modalities"),
        ({"modalities": "audio"}, TypeError, "single string"),
        ({"dim": 0}, ModbalanceError, "`dim` must be >= 1"),
        ({"dim": {"audio": 4}}, ModbalanceError, "missing modality 'video'"),
        ({"num_outputs": 0}, ModbalanceError, "`num_outputs` must be >= 1"),
        ({"hidden": 0}, ModbalanceError, "`hidden` must be >= 1"),
        ({"max_learners": 0}, ModbalanceError, "`max_learners` must be >= 1"),
        ({"gamma": 1.5}, ModbalanceError, "`gamma` must be <= 1.0"),
        ({"lam": 0.0}, ModbalanceError, "`lam` must be > 0"),
        ({"margin": -0.1}, ModbalanceError, "`margin` must be >= 0"),
        ({"every": 0}, ModbalanceError, "`every` must be >= 1"),
        ({"weights": (1.0,)}, ModbalanceError, "one weight per modality"),
        ({"weights": (0.0, 0.0)}, ModbalanceError, "must not all be zero"),
        ({"weights": (-1.0, 1.0)}, ModbalanceError, "`weights` must be >= 0"),
        ({"weights": {"audio": 1.0}}, ModbalanceError, "missing modality 'video'"),
        ({"phases": (3,)}, ModbalanceError, "phases"),
        ({"seed": 1.5}, TypeError, "`seed` must be an int"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
    args = {"modalities": ["audio", "video"], "dim": DIM, "num_outputs": CLASSES, **kwargs}
    with pytest.raises(error, match=match):
        AUG(**args)


def test_lam_other_than_one_needs_two_modalities():
    with pytest.raises(ModbalanceError, match="lam=1"):
        AUG(list(DIMS3), DIM, CLASSES, lam=1.2)
    assert AUG(list(INPUTS), DIM, CLASSES, lam=1.2).lam == 1.2


def test_step_errors_name_the_problem():
    aug = make_aug()
    enc = make_encoders(INPUTS)
    x, y = make_data(INPUTS, 4, "classification")
    feats = {m: enc[m](x[m]) for m in enc}
    with pytest.raises(ModbalanceError, match="missing 'video'"):
        aug.losses(step_output({"audio": feats["audio"]}, y), {})
    with pytest.raises(ModbalanceError, match=r"shape \(N, 4\)"):
        aug.losses(step_output({**feats, "video": feats["video"][:, :2]}, y), {})
    with pytest.raises(ModbalanceError, match="num_outputs=1"):
        aug.losses(step_output(feats, y.to(DTYPE), "regression"), {})
    with pytest.raises(ModbalanceError, match=r"view\(-1\)"):
        aug.losses(step_output(feats, y[:, None], present={}), {})
    bad = {"audio": torch.ones(3, dtype=torch.bool), "video": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(ModbalanceError, match=r"out.present\['audio'\]"):
        aug.losses(step_output(feats, y, present=bad), {})
    with pytest.raises(ModbalanceError, match=r"`out\.task` must be one of"):
        aug.losses(step_output(feats, y, "ranking"), {})
    with pytest.raises(ModbalanceError, match="missing 'audio'"):
        aug.predict({"video": feats["video"]})
    with pytest.raises(ModbalanceError, match="presence mask of 'audio'"):
        aug.predict(feats, bad)
    with pytest.raises(ModbalanceError, match="`epoch` must be >= 0"):
        aug.epoch_end(-1)


def test_boosting_loss_errors():
    total, y = torch.zeros(3, CLASSES), torch.tensor([0, 1, 2])
    with pytest.raises(ModbalanceError, match="go together"):
        aug_boosting_loss(total, y, "classification", previous=total)
    with pytest.raises(ModbalanceError, match="shape of `total`"):
        aug_boosting_loss(total, y, "classification", total[:, :2], total[:, :2])
    with pytest.raises(ModbalanceError, match=r"shape \(N,\)"):
        aug_boosting_loss(total, y.float(), "regression")
    with pytest.raises(ModbalanceError, match=r"shape \(N, C\)"):
        aug_boosting_loss(total[:, 0], y, "classification")
    with pytest.raises(ModbalanceError, match="`task` must be one of"):
        aug_boosting_loss(total, y, "ranking")
    with pytest.raises(ModbalanceError, match="`gamma` must be >= 0"):
        aug_boosting_loss(total, y, "classification", gamma=-0.5)
    with pytest.raises(TypeError, match="integer class indices"):
        aug_boosting_loss(total, y.float(), "classification")
