"""Training objectives compared at equal compute: held-out bits/byte, per-depth loss,
agreement and decoding speed of each configuration under one budget.

`python -m benchmarks.learning [--budget-flops d0:300 | --budget-seconds S |
--budget-steps N] [--configs NAME ...] [--seeds 0 1 2 | --repeats R] [--quick]`
(also `python benchmarks/learning.py`).

Each configuration of `CONFIGS` (the default job, `eqx-mtp train`, with the fields
given) trains with the real job, `eqx_mtp.train.train`, once per seed, in a run
directory of its own (under `--runs-dir`, else a temporary one), on the embedded
corpus (the standard library's `.py` files; `--data` for another). The budget is
one of

- `--budget-steps N`: every configuration trains `N` steps;
- `--budget-flops F`: model FLOPs by the FLOP model (`_flops.step_flops`, summed
    over the steps, each counting the depths it computes); each configuration
    trains the largest number of steps within `F`, so equal FLOPs means equal within
    one step;
- `--budget-seconds S`: seconds of training (compilation and evals apart); each
    configuration's seconds per step are measured first by a probe run
    (`--probe-steps`, once per configuration and number of depths computed), and it
    trains the steps that fill `S`; the seconds it then took are reported.

A FLOPs or seconds budget may also be `NAME:STEPS`, what configuration NAME spends
in STEPS steps: the default is `--budget-flops d0:300`, D = 0's FLOPs in the default
job's 300 steps. The cosine schedule needs the number of steps before the run, so it
is fixed first.

Each run evaluates about `--evals` times (the job's `eval_every`) and records the
final held-out main bits/byte, per-depth loss and agreement with the trunk
(`depth_agreement`), then decodes `--prompts` held-out prompts greedily with
self-speculative decoding (`eqx_mtp.generate`, `speculative=True`) for tokens per
trunk pass. Reported: a Markdown table, mean ± standard deviation over seeds
(`learning.md`, and the docs section), the results JSON (`learning.json`), and one
plot (`learning.png`): held-out bits/byte against model FLOPs and against seconds of
training, a curve per configuration (the mean over seeds, the band their range).

`--quick`: a tiny model (one layer of width 32, rows of 32 bytes, batch 4), D = 0
and D = 1, one seed, the FLOPs of D = 0 for 6 steps: seconds, for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _budget  # noqa: E402
import _common  # noqa: E402
import _learning_report  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import eqx_mtp  # noqa: E402
from eqx_mtp.train import ObjectiveConfig, TrainConfig  # noqa: E402
from eqx_mtp.train._config import UserError  # noqa: E402


def _half_way_weight(steps: int) -> str:
    """λ 0.3, then 0.1 from half the run on."""
    return f"0.3@0,0.1@{max(1, steps // 2)}"


CONFIGS: dict[str, dict] = {
    "d0": dict(num_depths=0),
    "d1": dict(num_depths=1),
    "d2": dict(num_depths=2),
    "d2_linear": dict(num_depths=2, mtp_block="linear"),
    "d2_mlp": dict(num_depths=2, mtp_block="mlp"),
    "d2_shared": dict(num_depths=2, shared_depth_layer=True),
    "d2_parallel": dict(num_depths=2, mtp_kind="parallel"),
    "d2_forward": dict(num_depths=2, depth_schedule="forward"),
    "d2_reverse": dict(num_depths=2, depth_schedule="reverse"),
    "d2_lambda": dict(num_depths=2, mtp_weight=_half_way_weight),
}
"""The configurations compared: the job's fields that differ from the default job's
(a callable value is given the run's number of steps)."""

QUICK_MODEL = dict(
    dim=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_dim=64,
    seq_len=32,
    batch_size=4,
    warmup_steps=1,
    eval_batches=1,
)
QUICK_CONFIGS = ("d0", "d1")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a comparison runs: the job's fields every run shares (`base`), the
    configurations, seeds, budget, and where the runs go."""

    base: dict
    configs: dict[str, dict]
    seeds: tuple[int, ...]
    budget: _budget.Budget
    runs: pathlib.Path
    evals: int
    probe_steps: int


def job_values(plan: Plan, name: str, steps: int, **run) -> dict:
    """The flat fields of configuration `name`'s job of `steps` steps; `run` adds or
    overrides fields (directory, seed, evaluation)."""
    values = dict(plan.base, steps=steps)
    for field, value in plan.configs[name].items():
        values[field] = value(steps) if callable(value) else value
    return values | run


def job_config(plan: Plan, name: str, steps: int) -> TrainConfig:
    """Configuration `name` as the job reads it, for a run of `steps` steps."""
    return TrainConfig.from_dict(job_values(plan, name, steps))


def knows_curricula() -> bool:
    """Whether the job has depth curricula (`ObjectiveConfig.depth_schedule`)."""
    return any(f.name == "depth_schedule" for f in dataclasses.fields(ObjectiveConfig))


# -- the budget ------------------------------------------------------------------------


class Costs:
    """Each configuration's cost of one step by depths computed (`_budget`): model
    FLOPs by the FLOP model, or seconds measured by probe runs (cached, so that a
    configuration shared by several entries is probed once)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.probed: dict[str, float] = {}
        self.costs: dict[str, list[float]] = {}

    def per_step(self, name: str) -> list[float]:
        """Configuration `name`'s cost of one step that computes `k` depths, for `k =
        0 … D`."""
        if name not in self.costs:
            self.costs[name] = self._per_step(name)
        return self.costs[name]

    def _per_step(self, name: str) -> list[float]:
        plan = self.plan
        # A step's cost does not depend on the run's length; a curriculum's stages
        # need a run of a few steps at least.
        config = job_config(plan, name, 1000)
        if plan.budget.kind == "flops":
            return _budget.flops_per_step(config)
        num_depths = config.model.num_depths
        values = job_values(plan, name, plan.probe_steps)
        if getattr(config.objective, "depth_schedule", None) is None:
            return [self.probe(values)] * (num_depths + 1)
        # A curriculum's stages each run the program of a model of that many depths.
        values.pop("depth_schedule")
        return [self.probe(dict(values, num_depths=k)) for k in range(num_depths + 1)]

    def probe(self, values: dict) -> float:
        """Seconds per step of the job `values` describes, from a run of
        `plan.probe_steps` steps (the first, which compiles, left out)."""
        key = json.dumps(values, sort_keys=True)
        if key not in self.probed:
            # Named by what it runs: a kept --runs-dir holds a probe per job.
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            directory = self.plan.runs / "probes" / digest
            values = dict(
                values, run=str(directory), eval_every=0, eval_batches=1,
                save_every=0, log_every=self.plan.probe_steps, seed=0,
            )  # fmt: skip
            config = TrainConfig.from_dict(values)
            summary = eqx_mtp.train.train(config, progress=False)
            tokens = config.data.batch_size * config.data.seq_len
            self.probed[key] = tokens / summary["tokens_per_second"]
            print(
                f"probe: {self.probed[key] * 1e3:.1f} ms per step "
                f"({values.get('num_depths')} depths)",
                flush=True,
            )
        return self.probed[key]

    def budget_amount(self) -> float:
        """The budget in its unit."""
        budget = self.plan.budget
        if budget.amount is not None:
            return budget.amount
        name, steps = budget.reference
        config = job_config(self.plan, name, steps)
        return _budget.run_cost(self.per_step(name), _budget.active_depths(config))

    def steps(self, name: str, amount: float) -> int:
        """The steps configuration `name` trains under `amount`."""
        if self.plan.budget.kind == "steps":
            return int(amount)
        costs = self.per_step(name)

        def cost(steps):
            try:
                config = job_config(self.plan, name, steps)
            except UserError:
                return 0.0  # too short for its curriculum's stages: below the answer
            return _budget.run_cost(costs, _budget.active_depths(config))

        return _budget.steps_within(cost, amount, limit=int(amount / min(costs)) + 1)


# -- one run ---------------------------------------------------------------------------


@functools.cache
def _documents(data: str | None) -> list:
    return eqx_mtp.train.load_documents(data)


def held_out_prompts(config: TrainConfig, count: int, length: int) -> np.ndarray:
    """`[count, length]` prompts: the first tokens of the run's held-out documents
    (as the job splits them) that hold `length` tokens, as many as there are up to
    `count`."""
    _, held_out = eqx_mtp.train.split_documents(
        _documents(config.data.path),
        eval_fraction=config.data.eval_fraction,
        seed=config.run.seed,
    )
    rows = [eqx_mtp.train.encode_document(doc) for doc in held_out]
    rows = [row[:length] for row in rows if len(row) >= length][:count]
    if not rows:
        raise SystemExit(
            f"no held-out document holds {length} tokens: lower --prompt-len"
        )
    return np.stack(rows)


def _read_metrics(run: pathlib.Path) -> tuple[dict, dict]:
    """`(train, evals)`: the job's train records and eval results by step."""
    train, evals = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial last line
        if "eval" in record:
            evals[record["step"]] = record["eval"]
        else:
            train[record["step"]] = record
    return train, evals


def train_one(plan: Plan, name: str, steps: int, seed: int, args) -> dict:
    """Train configuration `name` for `steps` steps with `seed`, then decode; its
    record (final eval, curve, costs, decoding speed)."""
    directory = plan.runs / name / f"seed{seed}"
    every = max(1, steps // plan.evals)
    values = job_values(
        plan, name, steps, run=str(directory), seed=seed, eval_every=every,
        log_every=every, save_every=0,
    )  # fmt: skip
    config = TrainConfig.from_dict(values)
    started = time.perf_counter()
    summary = eqx_mtp.train.train(config, progress=False)
    wall_seconds = time.perf_counter() - started
    train, evals = _read_metrics(directory)

    depths = _budget.active_depths(config)
    flops = _budget.cumulative_cost(_budget.flops_per_step(config), depths)
    tokens = config.data.batch_size * config.data.seq_len
    curve = []
    for step, result in sorted(evals.items()):
        rate = train.get(step, {}).get("tokens_per_second") or None
        curve.append(
            dict(
                step=step,
                flops=flops[step - 1],
                seconds=step * tokens / rate if rate else None,
                bits_per_byte=result["main_bits_per_byte"],
            )
        )

    model, _ = eqx_mtp.train.load_checkpoint(directory)
    prompts = held_out_prompts(config, args.prompts, args.prompt_len)
    new_tokens = min(args.new_tokens, config.model.max_seq_len - args.prompt_len)
    generation = eqx_mtp.generate(model, prompts, max_new_tokens=new_tokens)
    final = summary["eval"]
    record = dict(
        config=name,
        seed=seed,
        steps=steps,
        num_depths=config.model.num_depths,
        model_flops=flops[-1],
        # The job's rate leaves out the first step, which compiles: none for one.
        train_seconds=steps * tokens / rate
        if (rate := summary["tokens_per_second"])
        else None,
        wall_seconds=wall_seconds,
        main_bits_per_byte=final["main_bits_per_byte"],
        depth_losses=final["depth_losses"],
        depth_agreement=final["depth_agreement"],
        depth_accuracy=final["depth_accuracy"],
        tokens_per_forward=generation.tokens_per_forward,
        acceptance=[float(a) for a in generation.acceptance],
        run=str(directory),
        curve=curve,
    )
    print(
        f"{name} seed {seed}: {steps} steps, {record['model_flops']:.3g} FLOPs, "
        f"{record['train_seconds'] or float('nan'):.2f} s, "
        f"{record['main_bits_per_byte']:.4f} bits/byte, "
        f"{record['tokens_per_forward']:.2f} tokens/pass",
        flush=True,
    )
    return record


# -- the command -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.learning",
        description=" ".join(__doc__.split("\n\n")[0].split()),
    )
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument(
        "--configs", nargs="+", metavar="NAME", help=f"a subset of {list(CONFIGS)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default 0 … repeats-1")
    parser.add_argument(
        "--repeats", type=int, default=3, help="seeds 0 … R-1 without --seeds"
    )
    budget = parser.add_mutually_exclusive_group()
    for kind in _budget.KINDS:
        budget.add_argument(
            f"--budget-{kind}",
            metavar="N" if kind == "steps" else "AMOUNT|NAME:STEPS",
        )
    parser.add_argument("--data", help="the corpus (default: the standard library)")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary)")
    parser.add_argument("--evals", type=int, default=10, help="evals per run")
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--num-devices", type=int, help="devices each run uses (default all)"
    )
    parser.add_argument("--tag", default="", help="suffix of the results' names")
    _common.add_run_flags(parser)
    return parser


QUICK_HELP = (
    "a tiny model, D = 0 and D = 1, one seed, D = 0's FLOPs for 6 steps: a smoke run"
)


def make_plan(args, parser, runs: pathlib.Path) -> Plan:
    """The plan the flags describe; a bad flag is a parser error."""
    names = args.configs or (list(QUICK_CONFIGS) if args.quick else list(CONFIGS))
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; the names are {list(CONFIGS)}")
    if not knows_curricula():
        for name in [n for n in names if "depth_schedule" in CONFIGS[n]]:
            print(f"{name}: skipped: this eqx_mtp has no depth curricula", flush=True)
            names.remove(name)
    base = dict(QUICK_MODEL) if args.quick else {}
    if args.data:
        base["data"] = args.data
    if args.num_devices or args.quick:
        base["num_devices"] = args.num_devices or 1
    seeds = args.seeds if args.seeds else list(range(1 if args.quick else args.repeats))
    try:
        budget = next(
            _budget.parse_budget(kind, text)
            for kind in _budget.KINDS
            if (text := getattr(args, f"budget_{kind}")) is not None
        )
    except StopIteration:
        budget = _budget.Budget("flops", reference=("d0", 6 if args.quick else 300))
    except ValueError as error:
        parser.error(str(error))
    if budget.reference is not None and budget.reference[0] not in CONFIGS:
        parser.error(f"the budget names {budget.reference[0]!r}, not a configuration")
    for name, value in (("--evals", args.evals), ("--probe-steps", args.probe_steps)):
        if value < (2 if name == "--probe-steps" else 1):
            parser.error(f"{name} must be >= {2 if name == '--probe-steps' else 1}")
    if not names or not seeds:
        parser.error("nothing to run: give --configs and --seeds (or --repeats >= 1)")
    if args.quick:
        args.prompts, args.prompt_len, args.new_tokens = 1, 8, 8
        args.probe_steps = min(args.probe_steps, 3)
    return Plan(
        base=base,
        configs={name: CONFIGS[name] for name in names},
        seeds=tuple(seeds),
        budget=budget,
        runs=runs,
        evals=args.evals,
        probe_steps=args.probe_steps,
    )


def compare(plan: Plan, args) -> dict:
    """Train every configuration and seed of `plan` under its budget; the payload of
    the results file."""
    costs = Costs(dataclasses.replace(plan, configs=CONFIGS | plan.configs))
    amount = costs.budget_amount()
    print(f"budget: {plan.budget.describe()} = {amount:.4g} {plan.budget.kind}")
    steps = {name: costs.steps(name, amount) for name in plan.configs}
    records = []
    for name in plan.configs:
        if steps[name] < 1:
            raise SystemExit(f"{name}: not one step fits the budget: raise it")
        for seed in plan.seeds:
            records.append(train_one(plan, name, steps[name], seed, args))
    return dict(
        benchmark="learning",
        environment=_common.environment(),
        settings=dict(
            base=plan.base,
            configs={n: job_values(plan, n, steps[n]) for n in plan.configs},
            seeds=list(plan.seeds),
            evals=plan.evals,
            prompts=args.prompts,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
        ),
        budget=dict(
            kind=plan.budget.kind,
            given=plan.budget.describe(),
            amount=amount,
            steps=steps,
            seconds_per_step=(
                {n: costs.per_step(n) for n in plan.configs}
                if plan.budget.kind == "seconds"
                else None
            ),
        ),
        results=records,
    )


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    parser = _parser()
    args = parser.parse_args(argv)
    _common.start(args)
    if jax.process_count() > 1:
        sys.exit("learning.py trains its runs in one process")
    scratch = None
    if args.runs_dir:
        runs = pathlib.Path(args.runs_dir)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="learning-")
        runs = pathlib.Path(scratch.name)
    plan = make_plan(args, parser, runs)
    try:
        payload = compare(plan, args)
    finally:
        if scratch is not None:
            scratch.cleanup()
    payload["seconds"] = time.perf_counter() - started
    _learning_report.write(payload, args)
    return payload


if __name__ == "__main__":
    main()
