"""Alone-trained unimodal teachers: the library's frozen wrapper, the step's check, the example's
training and cache (``examples/pase/teachers.py``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks.tasks import get_task
from examples.pase import PaSEConfig, TrainConfig, Trainer, make_loader
from examples.pase.teachers import teacher_inputs, train_teachers
from modbalance import ModbalanceError, StepOutput, TeacherOutput, UnimodalTeachers, balanced_step
from modbalance.balancing import BalancingMethod


def _modules():
    torch.manual_seed(0)
    enc = {"text": nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5)), "audio": nn.Linear(3, 4)}
    heads = {"text": nn.Linear(4, 1), "audio": nn.Linear(4, 1)}
    return enc, heads


def test_teachers_are_frozen_copies_in_eval_mode():
    enc, heads = _modules()
    teachers = UnimodalTeachers(enc, heads)
    assert all(not p.requires_grad for p in teachers.parameters())
    teachers.train()
    assert not teachers.training and not teachers.encoders["text"][1].training
    x = {"text": torch.randn(8, 5), "audio": torch.randn(8, 3)}
    a, b = teachers(x), teachers(x)  # dropout off: deterministic
    torch.testing.assert_close(a.features["text"], b.features["text"])
    with torch.no_grad():  # the user's modules may go on training: the teachers do not change
        enc["audio"].weight.add_(1.0)
    torch.testing.assert_close(teachers(x).features["audio"], a.features["audio"])
    assert a.unimodal["text"].shape == (8,) and a.features["audio"].shape == (8, 4)


def test_teacher_inputs_may_be_tuples_and_state_round_trips():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x, mask):
            return (self.lin(x) * mask[..., None]).sum(1)

    enc = {"a": Masked(), "b": nn.Linear(2, 4)}
    heads = {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}
    teachers = UnimodalTeachers(enc, heads)
    x = {"a": (torch.randn(5, 6, 3), torch.ones(5, 6)), "b": torch.randn(5, 2)}
    out = teachers(x)
    assert out.unimodal["a"].shape == (5, 3)  # logits stay (N, C)
    other = UnimodalTeachers({"a": Masked(), "b": nn.Linear(2, 4)}, heads)
    other.load_state_dict(teachers.state_dict())
    torch.testing.assert_close(other(x).unimodal["a"], out.unimodal["a"])


@pytest.mark.parametrize(
    ("encoders", "heads", "match"),
    [
        ({}, {"a": nn.Linear(1, 1)}, "`encoders` must be a non-empty mapping"),
        ({"a": nn.Linear(1, 1)}, {"a": "head"}, r"`heads\['a'\]` must be an nn.Module"),
        ({"a": nn.Linear(1, 1)}, {"b": nn.Linear(1, 1)}, "`heads` must have the modalities"),
        ([nn.Linear(1, 1)], {"a": nn.Linear(1, 1)}, "`encoders` must be a non-empty mapping"),
    ],
)
def test_bad_teacher_modules_are_refused(encoders, heads, match):
    with pytest.raises(ModbalanceError, match=match):
        UnimodalTeachers(encoders, heads)


def test_teacher_inputs_must_name_every_modality():
    teachers = UnimodalTeachers(*_modules())
    with pytest.raises(ModbalanceError, match="`inputs` is missing modality 'audio'"):
        teachers({"text": torch.randn(2, 5)})


class FeatureDistil(BalancingMethod):
    """A minimal teacher method: pull each encoder's features towards its teacher's."""

    needs_teacher = True

    def losses(self, out, losses):
        terms = {
            f"distil_{m}": (out.features[m] - out.teacher.features[m]).pow(2).mean()
            for m in out.features
        }
        return {**losses, **terms}


def _step_out(teacher=None):
    enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
    x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
    z = {m: enc[m](x[m]) for m in enc}
    present = {m: torch.ones(6, dtype=torch.bool) for m in enc}
    out = StepOutput(z, {m: z[m].sum(1) for m in z}, None, present, torch.randn(6), "regression")
    return enc, out._replace(teacher=teacher)


def test_balanced_step_refuses_a_teacher_method_without_teachers():
    enc, out = _step_out()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    with pytest.raises(ModbalanceError, match=r"FeatureDistil \(methods\[0\]\) distils from"):
        balanced_step(out, {"task": out.unimodal["text"].mean()}, [FeatureDistil()], opt)


def test_the_distillation_gradient_reaches_the_encoders_and_not_the_teachers():
    teachers = UnimodalTeachers(*_modules())
    x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
    enc, out = _step_out(teachers(x))
    assert isinstance(out.teacher, TeacherOutput)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    terms = balanced_step(out, {}, [FeatureDistil()], opt)
    assert sorted(terms) == ["distil_audio", "distil_text"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in teachers.parameters())


# ------------------------------------------------------------------ the example's teachers
@pytest.fixture(scope="module")
def task():
    return get_task("cls-synthetic", seed=0, quick=True)


def _trainer(task, cache):
    first = task.splits["train"]
    cfg = PaSEConfig(
        modalities=task.modalities,
        input_dims={m: first.dims[m] for m in task.modalities},
        task=task.task,
        num_outputs=task.num_outputs,
        dim=16,
        input_kind="vector",
        decision="head",
    )
    train = TrainConfig(
        epochs=2, switch_epoch=0, batch_size=32, progress=False, teacher_cache=cache
    )
    s = task.splits
    return Trainer(cfg, train, s["train"], s["valid"], s["test"], methods=[FeatureDistil()])


def test_the_trainer_trains_teachers_once_and_the_cache_gives_the_same_run(task, tmp_path):
    uncached = _trainer(task, None)
    assert uncached.parts.teachers is not None and uncached.teacher_seconds > 0
    first = _trainer(task, str(tmp_path))
    (saved,) = tmp_path.glob("teachers-*.pt")
    second = _trainer(task, str(tmp_path))  # a cache hit: same teachers, recorded time
    assert second.teacher_seconds == pytest.approx(first.teacher_seconds, rel=1e-6)
    for a, b in zip(first.parts.teachers.parameters(), second.parts.teachers.parameters()):
        torch.testing.assert_close(a, b)
    # the teachers' training leaves the run's random state alone: cached == uncached
    results = [t.run()["test"]["fused"]["WA"] for t in (uncached, second)]
    assert results[0] == results[1]
    assert saved.exists()


def test_the_teachers_are_the_alone_trained_heads(task):
    trainer = _trainer(task, None)
    batch = next(iter(make_loader(task.splits["valid"], 64, train=False)))
    out = trainer.parts.teachers(teacher_inputs(batch))
    # the same models trained by hand: UME (each encoder/head pair on its own loss), no warm-up
    alone_cfg = replace(trainer.config, methods=("ume",), switch_epoch=0, teacher_cache=None)
    s = task.splits
    alone = Trainer(trainer.model_config, alone_cfg, s["train"], s["valid"], s["valid"])
    alone.fit()
    pred = alone.model.predict(batch)
    for m in task.modalities:
        torch.testing.assert_close(out.unimodal[m], pred["unimodal"][m])
        torch.testing.assert_close(out.features[m], pred["features"][m])


def test_longer_trained_teachers_learn_their_modality(task):
    trainer = _trainer(task, None)
    config, s = replace(trainer.config, epochs=10), task.splits
    teachers, _ = train_teachers(trainer.model_config, config, s["train"], s["valid"])
    batch = next(iter(make_loader(task.splits["valid"], 64, train=False)))
    logits = teachers(teacher_inputs(batch)).unimodal["strong"]
    accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
    assert accuracy > 3.0 / task.num_outputs  # chance is 1 / num_outputs
