"""The benchmarks in benchmarks/ run (``--quick``) and write what the docs and README show."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import competition, run_all, speed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """One ``run_all --quick`` over every benchmark, the competition smoke mode included."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        written = run_all.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, written


def test_run_all_quick_writes_every_table_and_plot(quick_results):
    out, written = quick_results
    names = {p.name for p in written}
    assert {f"{n}.md" for n in run_all.BENCHMARKS} <= names
    for name in run_all.BENCHMARKS:
        text = (out / f"{name}.md").read_text()
        assert text.startswith("# ") and "|---" in text, name
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert f"({name}.png)" in text
    tasks = [t for t in competition.TASK_NAMES if t != "mfeat" or competition.mfeat_available()]
    for task in tasks:
        assert (out / f"competition_{task}_quick.md").read_text().startswith(f"## {task}")
        assert (out / f"competition_{task}_quick.png").stat().st_size > 1000


def test_speed_quick_result_is_complete_and_sane(quick_results):
    out, _ = quick_results
    result = json.loads((out / "speed.json").read_text())
    main = result["main"]
    assert main["plain_ms"] > 0 and main["pase_ms"] > 0
    assert main["ratio"] == pytest.approx(main["pase_ms"] / main["plain_ms"])
    names = [r["component"] for r in result["breakdown"]]
    for piece in (
        "encoders",
        "calibration",
        "OT alignment",
        "gated fusion",
        "Shapley game",
        "modulator",
    ):
        assert any(piece in n for n in names), piece
    assert {r["axis"] for r in result["sweep"]} == {"batch", "K", "M"}
    assert all(r["pase_ms"] > 0 and r["plain_ms"] > 0 for r in result["sweep"])


def test_speed_steps_train_and_only_pase_modulates():
    dims = {"text": 6, "audio": 3}
    batch = speed.make_batch(8, 5, dims, "regression", 7, "cpu")
    assert batch["mask"]["text"].any(1).all() and batch["label"].abs().max() <= 3
    for pase in (False, True):
        parts = speed.build(pase, dims, "cpu", dim=8)
        step = speed.make_step(parts, batch, None)
        before = [p.detach().clone() for p in parts.model.parameters()]
        if pase:
            step(phase=1)
        step()
        assert any(not torch.equal(a, p) for a, p in zip(before, parts.model.parameters()))
        if pase:
            (modulator,) = parts.methods
            assert bool(modulator.initialized)
        else:
            assert parts.methods == [] and parts.model.fusion is None


def test_benchmarks_use_no_private_example_names_and_no_path_edits():
    for path in (ROOT / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, path.name
        for line in text.splitlines():
            if re.match(r"\s*from examples", line):
                imported = line.split(" import ", 1)[1]
                assert not re.search(r"(^|[\s,(])_", imported), (path.name, line)


def test_one_train_step_in_the_repository():
    hits = [
        p
        for folder in ("examples", "benchmarks")
        for p in (ROOT / folder).rglob("*.py")
        if "def train_step" in p.read_text()
    ]
    assert [p.relative_to(ROOT).as_posix() for p in hits] == ["examples/pase/step.py"]


# ------------------------------------------------------------------------------------------
# the competition suite
# ------------------------------------------------------------------------------------------


def test_competition_quick_json_has_the_documented_schema(tmp_path):
    path = tmp_path / "runs.json"
    competition.main(
        [
            "--task",
            "cls-synthetic",
            "--methods",
            "joint,warmup,alone-ensemble",
            "--seeds",
            "0,1",
            "--quick",
            "--json",
            str(path),
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    data = json.loads(path.read_text())
    assert data["task"] == "cls-synthetic" and data["primary"] == "accuracy"
    pairs = {(r["method"], r["seed"]) for r in data["runs"]}
    for m in ("joint", "warmup", "alone", "alone-ensemble"):
        assert {(m, 0), (m, 1)} <= pairs
    for r in data["runs"]:
        assert set(r["probe"]) == set(data["meta"]["modalities"])
        assert all(0.0 <= v <= 1.0 for v in r["probe"].values())
        if r["method"] != "alone":
            assert 0.0 <= r["fused"]["accuracy"] <= 1.0
    # a second call trains nothing: every run comes from the cache
    logs = []
    again = competition.run_task(
        "cls-synthetic", ("joint",), (0, 1), quick=True, cache=tmp_path / "cache", log=logs.append
    )
    assert "0 runs to train" in logs[0] and len(again["runs"]) == 2


def _run(method, seed, fused, probe, shares=None):
    return {
        "method": method,
        "seed": seed,
        "fused": {"accuracy": fused},
        "probe": probe,
        "shares": shares or {},
        "time_s": 1.0,
        "selected_epoch": 3,
    }


def test_summarize_gap_closed_and_paired_deltas_by_hand():
    runs = []
    for seed, off in ((0, 0.0), (1, 0.02)):
        runs.append(_run("joint", seed, 0.80 + off, {"s": 0.9, "w": 0.60 + off}))
        runs.append(_run("alone", seed, math.nan, {"s": 0.9, "w": 0.80 + off}))
        runs.append(_run("m", seed, 0.83 + off, {"s": 0.9, "w": 0.75 + off}))
    result = {
        "task": "t",
        "primary": "accuracy",
        "runs": runs,
        "meta": {"modalities": ["s", "w"], "weak": ["w"]},
    }
    s = competition.summarize(result)
    assert s["gap"]["w"] == pytest.approx(0.20)
    row = s["methods"]["m"]
    assert row["gap_closed"] == pytest.approx(0.75)  # (0.76 - 0.61) / (0.81 - 0.61)
    assert row["delta_fused"] == pytest.approx((0.03, 0.0))
    assert row["delta_weak_probe"][0] == pytest.approx(0.15)
    assert row["ratio"]["w"] == pytest.approx(0.76 / 0.81)
    assert s["methods"]["joint"]["gap_closed"] == pytest.approx(0.0)
    md = competition.to_markdown(s)
    assert "| m | 84.0 ± 1.4 | +3.0 ± 0.0 | 75 % | +15.0 ± 0.0 | 90.0 (1.00) | 76.0 (0.94) |" in md


def test_summarize_reports_no_gap_closed_without_a_gap():
    runs = [
        _run("joint", 0, 0.8, {"s": 0.9, "w": 0.8}),
        _run("alone", 0, math.nan, {"s": 0.9, "w": 0.7}),
        _run("m", 0, 0.8, {"s": 0.9, "w": 0.75}),
    ]
    s = competition.summarize(
        {
            "task": "t",
            "primary": "accuracy",
            "runs": runs,
            "meta": {"modalities": ["s", "w"], "weak": ["w"]},
        }
    )
    assert math.isnan(s["methods"]["m"]["gap_closed"])
    assert "| m |" in competition.to_markdown(s)


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit, match="unknown methods"):
        competition.run_task("cls-synthetic", ("nope",), (0,), quick=True, cache=None)


def test_a_configuration_two_names_resolve_to_is_trained_once(tmp_path):
    msa = competition.get_task("msa-synthetic", quick=True)
    cls = competition.get_task("cls-synthetic", quick=True)

    def same(task, a, b):
        key = competition._effective
        return key(task, a, True, "cpu") == key(task, b, True, "cpu")

    # regression: the "auto" decision is the fusion head, so "no residual" changes nothing
    assert same(msa, "pase", "pase-no-residual")
    assert not same(cls, "pase", "pase-no-residual")  # classification: "auto" is the residual
    assert not same(msa, "joint", "warmup") and not same(msa, "pase", "pase-no-sge")
    lines = []
    out = competition.run_task(
        "msa-synthetic",
        ("pase-no-residual", "joint", "pase"),
        (0, 1),
        quick=True,
        cache=tmp_path,
        log=lines.append,
    )
    assert "4 runs to train, 2 the same as another name, 0 cached" in lines[0]
    runs = {(r["method"], r["seed"]): r for r in out["runs"]}
    assert [r["method"] for r in out["runs"]] == ["pase-no-residual"] * 2 + ["joint"] * 2 + [
        "pase"
    ] * 2  # in the order asked for
    for seed in (0, 1):
        copy, source = runs["pase", seed], runs["pase-no-residual", seed]
        assert copy.pop("same_as") == "pase-no-residual" and copy.pop("method") == "pase"
        assert copy == {k: v for k, v in source.items() if k != "method"}
    # the copies are cached under their own names too
    again = competition.run_task(
        "msa-synthetic", ("pase",), (0, 1), quick=True, cache=tmp_path, log=lines.append
    )
    assert "0 runs to train, 0 the same as another name, 2 cached" in lines[-1]
    assert [r["seed"] for r in again["runs"]] == [0, 1]


def test_method_groups_expand_in_order_and_cover_the_default():
    assert competition.expand_methods(None) == competition.GROUPS["all"]
    assert competition.expand_methods("core") == (
        "joint", "warmup", "pase", "alone", "alone-ensemble", "alone-probe",
    )  # fmt: skip
    # names and groups mix; a name already listed is not repeated
    assert competition.expand_methods("ume, core")[:3] == ("ume", "joint", "warmup")
    assert competition.expand_methods("joint,joint") == ("joint",)
    every = set(competition.expand_methods("core,field,ablations"))
    assert every == set(competition.GROUPS["all"])  # the groups partition the default
    with pytest.raises(SystemExit, match="unknown methods"):
        competition.run_task(
            "cls-synthetic", competition.expand_methods("core,nope"), (0,), quick=True, cache=None
        )


def test_validation_table_shows_the_mae_that_selection_minimises():
    runs = [
        {"method": "a", "valid_fused": {"Non0_acc_2": 0.9, "MAE": 0.4}},
        {"method": "a", "valid_fused": {"Non0_acc_2": 0.8, "MAE": 0.5}},
        {"method": "b", "valid_fused": {"Non0_acc_2": 0.95, "MAE": 0.3}},
    ]
    table = competition.validation_table({"primary": "Non0_acc_2", "runs": runs})
    lines = table.splitlines()
    assert lines[0] == "| method | validation Non0_acc_2 % | validation MAE | seeds |"
    assert lines[2] == "| b | 95.0 ± 0.0 | 0.3000 ± 0.0000 | 1 |"  # best primary first
    assert lines[3] == "| a | 85.0 ± 7.1 | 0.4500 ± 0.0707 | 2 |"
    cls = [{"method": "c", "valid_fused": {"accuracy": 0.5}}]
    table = competition.validation_table({"primary": "accuracy", "runs": cls})
    assert table.splitlines()[0] == "| method | validation accuracy % | seeds |"


def test_composite_method_names_and_the_default_pase_spec():
    spec = competition.spec_of("warmup+sge+safecal+res")
    assert spec.warmup and spec.methods == ("sge",)
    assert spec.model["calibration"] and spec.model["safe_calibration"]
    assert spec.model["decision"] == "residual" and not spec.model["alignment"]
    pase = competition.spec_of("pase")
    assert pase.warmup and pase.methods == ("sge",) and pase.model["decision"] == "auto"
    assert competition.spec_of("warmup+nowarmhead+sge+dgate").model == {
        **competition._PLAIN,
        "warm_head": False,
        "decision": "gate",
    }
    assert (
        competition.spec_of("cggm").methods == ("cggm",) and not competition.spec_of("cggm").warmup
    )
    with pytest.raises(KeyError):
        competition.spec_of("warmup+nope")


def test_leaderboard_lists_every_method_of_every_task():
    def summary(task, fused):
        runs = [
            _run("joint", 0, fused, {"s": 0.9, "w": 0.6}),
            _run("alone", 0, math.nan, {"s": 0.9, "w": 0.8}),
            _run("m", 0, fused + 0.02, {"s": 0.9, "w": 0.7}),
        ]
        return competition.summarize(
            {
                "task": task,
                "primary": "accuracy",
                "runs": runs,
                "meta": {"modalities": ["s", "w"], "weak": ["w"]},
            }
        )

    md = competition.leaderboard([summary("a", 0.8), summary("b", 0.7)])
    assert (
        "| m | 82.0 ± 0.0 | +2.0 ± 0.0 | 50 % | 1.0 | 72.0 ± 0.0 | +2.0 ± 0.0 | 50 % | 1.0 |" in md
    )
    rst = competition._rst_table(md, "x")
    assert rst.startswith(".. list-table:: x") and "   * - m" in rst


def test_main_job_quick_compares_pase_with_its_baseline(tmp_path):
    from benchmarks import main_job

    result = main_job.main(["--seeds", "0", "--quick", "--out", str(tmp_path)])
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {("pase", 0), ("baseline", 0)}
    assert all(r["MAE"] > 0 and r["wall_s"] > 0 for r in result["runs"])
    assert "PaSE − baseline (paired)" in (tmp_path / "main_job_quick.md").read_text()


def test_loading_quick_reads_the_file_once_and_writes_its_table(tmp_path):
    from benchmarks import loading

    out = loading.main(["--quick", "--out", str(tmp_path / "res"), "--tmp", str(tmp_path)])
    assert out == tmp_path / "res" / "loading.md"
    text = out.read_text()
    assert text.startswith("# Loading a MOSEI-sized data file") and "|---" in text
    assert "`pickle.load` calls per `build_datasets`: 1." in text
    rows = [line for line in text.splitlines() if line.startswith(("| 0.25 |", "| 1 |"))]
    assert len(rows) == 2, text
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2].replace(",", "")) > 0  # file MB
        assert float(cells[4]) > 0 and float(cells[11]) > 0  # load s, epoch s
    assert [p.name for p in tmp_path.iterdir()] == ["res"]  # the data files were removed


def test_the_prepared_device_script_names_only_what_exists():
    """`benchmarks/device_check.sh` runs on a lent GPU only: check here what it calls exists."""
    import importlib
    import re
    import subprocess
    from pathlib import Path

    from examples import pase_mosi

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    modules = set(re.findall(r"python -m (benchmarks\.\w+)", text))
    assert modules == {"benchmarks.cuda_sync_check", "benchmarks.speed"}
    for name in modules:
        assert callable(importlib.import_module(name).main)
    flags = set(re.findall(r"examples/pase_mosi\.py[^\n]*\n?[^\n]*", text))
    used = {f for line in flags for f in re.findall(r"(--[a-z-]+)", line)}
    help_text = pase_mosi.build_parser().format_help() if hasattr(pase_mosi, "build_parser") else ""
    if not help_text:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            pase_mosi.parse_args(["--help"])
        help_text = buf.getvalue()
    missing = [f for f in used if f not in help_text]
    assert not missing, missing


# ------------------------------------------------------------------------------------------
# speed: the default recipe, the M x batch grid and the sampled game's accuracy
# ------------------------------------------------------------------------------------------


def test_speed_default_recipe_is_the_example_command():
    from examples import pase_mosi

    args = pase_mosi.parse_args([])
    dims = {"text": 6, "audio": 3}
    config, methods, game_every = speed.example_recipe(dims)
    assert config.dim == args.dim and methods == pase_mosi.methods_from(args)
    assert game_every == args.game_every and not config.baseline
    plain, _, _ = speed.example_recipe(dims, baseline=True)
    assert plain.baseline and plain.dim == args.dim
    parts = speed.build(True, dims, "cpu", recipe="default")
    assert [type(m).__name__ for m in parts.methods] == ["ShapleyEquilibrium"]
    assert speed.build(False, dims, "cpu", recipe="default").methods == []
    with pytest.raises(ValueError, match="unknown recipe"):
        speed.build(True, dims, "cpu", recipe="fast")


def test_speed_quick_grid_and_sampled_accuracy(quick_results):
    out, _ = quick_results
    result = json.loads((out / "speed.json").read_text())
    grid = result["grid"]
    assert {r["recipe"] for r in grid} == {"default", "paper"}
    assert len(grid) == 2 * len({(r["M"], r["batch"]) for r in grid})
    for r in grid:
        assert r["ratio"] == pytest.approx(r["pase_ms"] / r["plain_ms"])
        assert r["ratio_paired"] > 0 and r["rounds"] >= result["grid_steps"]
        m = r["M"]
        assert r["game_ms"] > 0 and r["game_exact"] == (m <= 6)
        assert r["coalitions"] == (2**m if m <= 6 else 2 * m + 2 + m * (m - 3))
    assert [r["value"] for r in result["sweep"] if r["axis"] == "M"] == sorted(
        {r["M"] for r in grid}
    )
    acc = result["accuracy"]
    assert {r["recipe"] for r in acc} == {"default", "paper"}
    for r in acc:
        assert 0 <= r["share_err_mean"] <= r["share_err_p95"] + 1e-12 <= 1 + 1e-12
        assert r["phi_rel_err_mean"] >= 0 and r["exact_share_spread"] >= 0
        assert r["coalitions"] < 2 ** r["M"]
    text = (out / "speed.md").read_text()
    for heading in ("## Scaling with the number of modalities", "## Accuracy of the sampled game"):
        assert heading in text
    assert "default recipe" in text and "Target <= 1.20x" in text
    mc = result["marginal"]
    assert (mc["M"], mc["batch"]) == (min(r["M"] for r in grid), min(r["batch"] for r in grid))
    assert [r["part"] for r in mc["rows"]] == [label for label, _, _ in speed.MARGINALS]
    assert all(r["without_ms"] > 0 for r in mc["rows"]) and mc["plain_ms"] > 0
    assert "## What each part of the paper's step costs (M = 2, batch 16)" in text


def test_speed_variants_switch_off_exactly_one_part():
    dims = {"text": 6, "audio": 3}
    for label, switches, methods in speed.MARGINALS:
        parts = speed.build(True, dims, "cpu", dim=8, switches=switches, methods=methods)
        config = parts.model.config
        for key in ("calibration", "alignment", "gate"):
            assert getattr(config, key) == switches.get(key, True), (label, key)
        assert [type(m).__name__ for m in parts.methods] == (
            [] if methods == () else ["ShapleyGradModulator"]
        ), label


# ------------------------------------------------------------------ tuning and method options
def test_method_names_carry_constructor_options():
    from examples.pase.step import parse_method

    assert parse_method("ogm-ge@alpha=1.0,noise=False") == (
        "ogm-ge",
        {"alpha": 1.0, "noise": False},
    )
    assert parse_method("dgl") == ("dgl", {})
    with pytest.raises(ValueError, match="must be key=literal"):
        parse_method("ogm-ge@alpha=fast")
    with pytest.raises(ValueError, match="must be key=literal"):
        parse_method("ogm-ge@alpha")


def test_an_option_reaches_the_method_built_from_a_name():
    from examples.pase import PaSEConfig, build

    cfg = PaSEConfig(modalities=("a", "b"), input_dims={"a": 3, "b": 4}, dim=8, heads=2)
    (ogm,) = build(cfg, methods=["ogm-ge@alpha=0.25"]).methods
    assert ogm.alpha == 0.25
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        build(cfg, methods=["ogm-ge@nonsense=1"])


def test_suite_names_set_training_and_method_options():
    from benchmarks.competition import spec_of

    spec = spec_of("pase+lr=0.002+@weight=2.0")
    assert spec.methods == ("sge@weight=2.0",) and spec.train == {"lr": 0.002}
    assert spec.warmup and spec.model == spec_of("pase").model
    assert spec_of("warmup+switch_epoch=4").train == {"switch_epoch": 4}
    assert spec_of("pase+calibration") == competition.SPECS["pase+calibration"]  # a name, whole
    assert spec_of("pase+calibration+lr=0.002").train == {"lr": 0.002}
    assert spec_of("ogm-ge@alpha=1.0").methods == ("ogm-ge@alpha=1.0",)
    with pytest.raises(KeyError, match="epochs=3"):
        spec_of("joint+epochs=3")


def test_every_method_gets_the_same_tuning_budget_and_the_choice_reads_validation():
    from benchmarks import tuning

    for method in tuning.COEFFICIENTS:
        names = tuning.grid(method)
        assert len(names) == len(set(names)) <= 6
        assert tuning.default_name(method) in names  # the defaults are one of the configurations
    names = tuning.grid("joint")
    runs = [
        {"method": n, "valid_fused": {"accuracy": 0.5 + 0.01 * i}, "fused": {"accuracy": 1 - i}}
        for i, n in enumerate(names)
        for _seed in (0, 1)
    ]
    choice = tuning.choose({"runs": runs}, "joint")
    assert choice["chosen"] == names[-1]  # the best on validation, whatever the test says
    with pytest.raises(SystemExit, match="no tuning grid"):
        tuning.grid("nonsense")


def test_tuning_quick_writes_its_choice_and_the_tuned_suite_uses_it(tmp_path):
    from benchmarks import tuning

    out = tmp_path / "results"
    result = tuning.main(["--quick", "--methods", "joint,umt", "--cache", "", "--out", str(out)])
    assert set(result["methods"]) == {"joint", "umt"}
    for method, t in result["methods"].items():
        assert t["chosen"] in tuning.grid(method) and len(t["configs"]) == 6
        assert all(r["seeds"] == 2 for r in t["configs"])
    (out / "tuning.json").write_text((out / "tuning_quick.json").read_text())
    loaded = tuning.load(out / "tuning.json")
    for method, t in result["methods"].items():  # the defaults are named plainly
        plain = t["chosen"] == tuning.default_name(method)
        assert loaded[method] == (method if plain else t["chosen"])
    argv = ["--quick", "--task", "cls-synthetic", "--methods", "joint,umt,alone-ensemble"]
    (run,) = competition.main([*argv, "--seeds", "0", "--cache", "", "--out", str(out), "--tuned"])
    assert {r["method"] for r in run["runs"]} == {"joint", "umt", "alone", "alone-ensemble"}
    assert (out / "competition_cls-synthetic_tuned_quick.md").exists()
    # the teachers' training time is part of the distilling method's cost
    umt = next(r for r in run["runs"] if r["method"] == "umt")
    joint = next(r for r in run["runs"] if r["method"] == "joint")
    assert umt["time_s"] > joint["time_s"]


def test_tuned_needs_a_tuning(tmp_path):
    with pytest.raises(SystemExit, match="--tuned needs"):
        competition.main(["--quick", "--tuned", "--out", str(tmp_path), "--cache", ""])


def test_a_worker_builds_its_task_once_and_runs_do_not_change_it(monkeypatch):
    built = []
    real = competition.get_task

    def counting(name, seed=0, quick=False, **kw):
        built.append(name)
        return real(name, seed=seed, quick=quick, **kw)

    monkeypatch.setattr(competition, "get_task", counting)
    monkeypatch.setattr(competition, "_WORKER_TASK", {})
    job = ("cls-synthetic", "joint", 0, True, "cpu")
    first = competition._job(job)
    task = competition._WORKER_TASK[("cls-synthetic", True)]
    before = {k: ds.batch(list(range(len(ds)))) for k, ds in task.splits.items()}
    again = competition._job(job)  # the kept task: the same run
    assert built == ["cls-synthetic"]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in again] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in first
    ]
    for k, ds in task.splits.items():  # no run wrote into the kept data
        after = ds.batch(list(range(len(ds))))
        for m in after["features"]:
            assert torch.equal(after["features"][m], before[k]["features"][m])
        assert torch.equal(after["label"], before[k]["label"])
    competition._job(("msa-synthetic", "joint", 0, True, "cpu"))
    assert built[-1] == "msa-synthetic" and list(competition._WORKER_TASK) == [
        ("msa-synthetic", True)
    ]  # one task kept at a time


def test_loading_says_whether_other_jobs_shared_the_cores():
    from benchmarks.loading import load_note

    assert load_note([0.7, 1.2]).endswith(
        "(about 1 is the measured process itself: no other job ran)"
    )
    busy = load_note([0.9, 4.2])
    assert busy.startswith("0.9, 4.2 (other jobs shared the cores: times are upper bounds")


def test_cached_runs_record_their_code_and_other_code_is_reported(tmp_path):
    lines = []
    kw = {"quick": True, "cache": tmp_path, "log": lines.append}
    out = competition.run_task("cls-synthetic", ("joint",), (0, 1), **kw)
    code = competition.code_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{12}", code)
    assert [r["code"] for r in out["runs"]] == [code, code]
    competition.run_task("cls-synthetic", ("joint",), (0, 1), **kw)
    assert lines[-1].endswith("0 runs to train, 0 the same as another name, 2 cached")
    # one record from other code, one that does not say: both reported, neither retrained
    first, second = sorted(tmp_path.glob("cls-synthetic_*_joint_*.json"))
    [run] = json.loads(first.read_text())
    first.write_text(json.dumps([run | {"code": "0" * 12}]))
    [run] = json.loads(second.read_text())
    del run["code"]
    second.write_text(json.dumps([run]))
    again = competition.run_task("cls-synthetic", ("joint",), (0, 1), **kw)
    assert lines[-1].endswith(
        "2 cached; 2 cached run records come from other code than this (or do not say): "
        "pass a new --cache to train them again"
    )
    assert [r.get("code") for r in again["runs"]] == ["0" * 12, None]
