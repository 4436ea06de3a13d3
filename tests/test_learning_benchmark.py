"""`benchmarks/learning.py`, configurations compared under one budget: its budget
accounting against the FLOP model summed step by step in a plain loop (equal FLOPs
means equal within one step, never above), a steps budget that gives every
configuration the same steps, and the quick mode end to end (table, JSON, plot)."""

import dataclasses
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def learning():
    # The scripts import their siblings by name, as `python benchmarks/learning.py`
    # does.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import learning

        yield learning
    finally:
        while str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


def _plan(learning, budget, names, tmp_path):
    return learning.Plan(
        base=dict(learning.QUICK_MODEL, num_devices=1),
        configs={name: learning.CONFIGS[name] for name in names},
        seeds=(0,),
        budget=budget,
        runs=tmp_path,
        evals=2,
        probe_steps=3,
    )


def _model_flops(model_config, depths, batch, seq):
    """The FLOP model summed over a run's steps, a model of `k` depths for a step
    that computes `k`."""
    from _flops import step_flops

    total = 0.0
    for k in depths:
        config = dataclasses.replace(model_config, num_depths=k)
        total += step_flops(config, batch=batch, seq=seq)["model"]["total"]
    return total


def _forward_curriculum(config):
    """Depths switched on one by one over the run, in a plain transcription: step
    `s` of `N` computes `s * (D + 1) // N` depths."""
    num_depths, steps = config.model.num_depths, config.run.steps
    return [s * (num_depths + 1) // steps for s in range(steps)]


@pytest.mark.parametrize("curriculum", [False, True])
def test_a_flops_budget_gives_each_configuration_the_most_steps_within_it(
    learning, tmp_path, monkeypatch, curriculum
):
    """Every configuration's FLOPs for its steps are within the budget, and one step
    more would exceed it; with a curriculum, each step counts the depths it
    computes."""
    import _budget

    if curriculum:
        monkeypatch.setattr(_budget, "active_depths", _forward_curriculum)
    names = ["d0", "d1", "d2", "d2_linear", "d2_parallel"]
    budget = _budget.Budget("flops", reference=("d0", 40))
    plan = _plan(learning, budget, names, tmp_path)
    costs = learning.Costs(plan)
    amount = costs.budget_amount()
    batch, seq = plan.base["batch_size"], plan.base["seq_len"]
    reference = learning.job_config(plan, "d0", 40)
    assert amount == _model_flops(reference.model, [0] * 40, batch, seq)
    steps = {name: costs.steps(name, amount) for name in names}
    for name in names:
        spent, more = (
            _model_flops(
                config.model,
                _forward_curriculum(config)
                if curriculum
                else [config.model.num_depths] * config.run.steps,
                batch,
                seq,
            )
            for config in (
                learning.job_config(plan, name, steps[name]),
                learning.job_config(plan, name, steps[name] + 1),
            )
        )
        assert spent <= amount < more, (name, steps[name], spent, amount, more)
    assert steps["d0"] == 40
    assert len(set(steps.values())) > 1, steps  # the depths cost steps


def test_a_steps_budget_gives_every_configuration_the_same_steps(learning, tmp_path):
    """Every default configuration the job knows (curricula where it has them)."""
    import _budget

    names = [
        name
        for name, fields in learning.CONFIGS.items()
        if learning.knows_curricula() or "depth_schedule" not in fields
    ]
    plan = _plan(learning, _budget.Budget("steps", amount=17), names, tmp_path)
    costs = learning.Costs(plan)
    amount = costs.budget_amount()
    assert {name: costs.steps(name, amount) for name in names} == dict.fromkeys(
        names, 17
    )


def test_budget_flags(learning):
    import _budget

    assert _budget.parse_budget("flops", "3e15") == _budget.Budget("flops", 3e15)
    assert _budget.parse_budget("seconds", "d0:300") == _budget.Budget(
        "seconds", reference=("d0", 300)
    )
    for kind, text in [("steps", "d0:300"), ("steps", "2.5"), ("flops", "-1"),
                       ("seconds", "fast"), ("flops", "d0:")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"--budget-{kind}"):
            _budget.parse_budget(kind, text)


@pytest.mark.slow
def test_quick_mode_writes_the_table_the_json_and_the_plot(
    learning, corpus, tmp_path, capsys
):
    """`--quick` on a small corpus: D = 0 and D = 1 trained by the job under D = 0's
    FLOPs for 6 steps, each within one step of them; the table has a row each, the
    plot is a PNG."""
    from _flops import step_flops

    results = tmp_path / "results"
    learning.main(
        ["--quick", "--data", corpus, "--results-dir", str(results)]
        + ["--runs-dir", str(tmp_path / "runs")]
    )
    payload = json.loads((results / "learning.json").read_text())
    assert payload["quick"] is True
    budget = payload["budget"]
    assert budget["kind"] == "flops"
    records = {r["config"]: r for r in payload["results"]}
    assert set(records) == {"d0", "d1"}
    settings = payload["settings"]["configs"]
    for name, record in records.items():
        values = settings[name]
        config = learning.TrainConfig.from_dict(values)
        step = step_flops(
            config.model, batch=values["batch_size"], seq=values["seq_len"]
        )
        one_step = step["model"]["total"]
        assert record["steps"] == budget["steps"][name] == values["steps"]
        assert record["model_flops"] == pytest.approx(record["steps"] * one_step)
        assert (
            record["model_flops"] <= budget["amount"] < record["model_flops"] + one_step
        )
        assert len(record["depth_losses"]) == len(record["depth_agreement"])
        assert len(record["depth_losses"]) == config.model.num_depths + 1
        assert record["tokens_per_forward"] >= 1.0
        curve = record["curve"]
        assert [p["step"] for p in curve] == sorted({p["step"] for p in curve})
        assert curve[-1]["step"] == record["steps"]
        assert curve[-1]["bits_per_byte"] == record["main_bits_per_byte"]
    table = (results / "learning.md").read_text().splitlines()
    assert table[0].startswith("| configuration |")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["`d0`", "`d1`"]
    assert (results / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curricula_are_counted_step_by_step(learning, tmp_path):
    """With depth curricula in the job, a step computes the depths its stage has on:
    `forward` on 9 steps with D = 2 is 3 steps of each of 0, 1, 2 depths, `reverse`
    the same backwards."""
    import _budget

    if not learning.knows_curricula():
        pytest.skip("this eqx_mtp has no depth curricula")
    plan = _plan(
        learning, _budget.Budget("steps", amount=9), ["d2_forward", "d2_reverse"],
        tmp_path,
    )  # fmt: skip
    forward = learning.job_config(plan, "d2_forward", 9)
    reverse = learning.job_config(plan, "d2_reverse", 9)
    assert _budget.active_depths(forward) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert _budget.active_depths(reverse) == [2, 2, 2, 1, 1, 1, 0, 0, 0]
