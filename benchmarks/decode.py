"""Decoding speed: plain cached greedy decoding against self-speculative decoding with
the MTP depths, on trained runs.

`python benchmarks/decode.py --run default=runs/default --run deep=runs/deep`

Each `--run NAME=DIR` is a run of `eqx-mtp train` (its newest checkpoint); the two the
docs report are made by

    eqx-mtp train --run runs/default
    eqx-mtp train --run runs/deep --num-layers 8 --num-depths 3

For each run and each `--batches` size: prompts are the first `--prompt-len` tokens
(BOS and bytes) of held-out documents (the run's own split), and each row generates
up to the model's `max_seq_len`. Plain and speculative greedy decoding are compiled
ahead of time, called once to warm up, then `--repeats` times interleaved; tokens/s
(new tokens of the whole batch per second) are medians with min–max. Reported too:
whether the two outputs are identical (they must be), tokens per trunk forward,
the sequential acceptance per depth, and where a round's time goes: one cached trunk
pass over `D + 1` tokens (verify) against the depths' drafting, each timed alone on
the same shapes.

Targets (batch 1): speculative ≥ 1.3× plain tokens/s on the default model, ≥ 1.8×
on the deeper one; at batch 8, never slower than plain. A round's parts: the verify
pass within 1.3× of a plain step, the drafts within `D / num_layers` of a step plus a
small constant.

`--quick` decodes at batch 1 from prompts of 8 tokens, once; without `--run` it first
trains a tiny run (one layer of width 32, 2 depths, rows of 32 bytes, 3 steps on a
generated corpus) in a temporary directory, which exercises the code, not the
speed-up: an untrained model's drafts are mostly rejected.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _profile import format_profiles, less, op_profile
from _timing import spread, time_interleaved

import eqx_mtp
from eqx_mtp._decode import loop_inputs, loop_rows

TARGETS = {"default": 1.3, "deep": 1.8}


def _prompts(config: dict, count: int, prompt_len: int) -> np.ndarray:
    """`[count, prompt_len]` prompts from the run's held-out documents."""
    train = config["train"]
    documents = eqx_mtp.train.load_documents(train["data"])
    _, held_out = eqx_mtp.train.split_documents(
        documents, eval_fraction=train["eval_fraction"], seed=train["seed"]
    )
    rows = [
        eqx_mtp.train.encode_document(doc)[:prompt_len]
        for doc in held_out
        if len(doc) >= prompt_len
    ]
    if len(rows) < count:
        raise SystemExit(
            f"only {len(rows)} held-out documents hold {prompt_len} bytes; "
            "lower --prompt-len or --batches"
        )
    return np.stack(rows[:count])


def _round_parts(
    model, prompts, max_new: int, rounds: int, repeats: int, profile: bool
) -> dict:
    """Seconds per round of a round's parts, each alone, as the decoding loop runs
    them (inside a compiled loop of `rounds` rounds, the weights compiled in as
    `generate` does on a CPU, less the prefill's time): the plain step (a cached
    trunk pass over one token), the verify pass over `D + 1` tokens, the depths'
    drafting, and a whole speculative round. With `profile`, also each part's
    operations per round (`_profile.op_profile`, the prefill's left out)."""
    batch, width = prompts.shape
    lengths = jnp.full((batch,), width, jnp.int32)
    keys = jax.random.split(jax.random.key(0), batch)
    num_drafts = model.config.num_depths

    def decoder(drafts):
        # Rows never finish here: every round of the loop does its work.
        return eqx_mtp.Decoder(
            model, max_new_tokens=10**6, num_drafts=drafts,
            length=eqx_mtp.Decoder.cache_length(width, max_new, drafts),
            temperature=0.0, top_k=None,
        )  # fmt: skip

    rows = loop_rows(batch)

    def looped(decoder, piece):
        def program():
            state = rows(decoder.prefill)(*loop_inputs(prompts, lengths, keys))
            if piece is None:
                return state.count
            state = jax.lax.fori_loop(0, rounds, lambda _, s: rows(piece)(s), state)
            return state.count

        compiled = jax.jit(program).lower().compile()
        return lambda: jax.block_until_ready(compiled())

    plain, spec = decoder(0), decoder(num_drafts)
    fixed = eqx_mtp.Drafts(jnp.zeros((num_drafts,), jnp.int32), None)

    def drafted(state):
        # Keeps the drafts alive, which the loop would otherwise drop unused.
        drafts, state = spec.draft(state)
        return eqx.tree_at(
            lambda s: s.count, state, state.count + jnp.minimum(drafts.tokens[0], 0)
        )

    programs = dict(
        plain_step=looped(
            plain,
            lambda s: plain.verify(s, eqx_mtp.Drafts(jnp.zeros((0,), jnp.int32), None)),
        ),
        verify=looped(spec, lambda s: spec.verify(s, fixed)),
        draft=looped(spec, drafted),
        round=looped(spec, spec.round),
        prefill=looped(spec, None),
        plain_prefill=looped(plain, None),
    )
    timings = time_interleaved(programs, repeats)
    seconds = {part: timing.median for part, timing in timings.items()}
    parts = ("plain_step", "verify", "draft", "round")
    prefill = {
        part: "plain_prefill" if part == "plain_step" else "prefill" for part in parts
    }
    result = {
        f"{part}_seconds": (seconds[part] - seconds[prefill[part]]) / rounds
        for part in parts
    }
    if profile:
        profiles = {
            part: op_profile(program, 5, rounds) for part, program in programs.items()
        }
        result["op_profiles"] = {
            part: less(profiles[part], profiles[prefill[part]]) for part in parts
        }
    return result


def measure(name: str, run: str, args) -> dict:
    model, config = eqx_mtp.train.load_checkpoint(run)
    model_config = model.config
    max_new = model_config.max_seq_len - args.prompt_len
    records = []
    for batch in args.batches:
        prompts = jnp.asarray(_prompts(config, batch, args.prompt_len), jnp.int32)

        def call(speculative):
            return eqx_mtp.generate(
                model, prompts, max_new_tokens=max_new, speculative=speculative
            )

        # The generation's own clock: compilation, and the lookup of the compiled
        # program, left out.
        timings = time_interleaved(
            dict(plain=lambda: call(False), spec=lambda: call(True)),
            args.repeats,
            timer=lambda generation, wall: generation.seconds,
        )
        compile_seconds = {m: t.first.compile_seconds for m, t in timings.items()}
        seconds = {mode: timing.seconds for mode, timing in timings.items()}
        plain, spec = timings["plain"].last, timings["spec"].last
        identical = bool(jnp.all(plain.tokens == spec.tokens))
        tokens = plain.tokens.size
        rates = {mode: [tokens / s for s in seconds[mode]] for mode in seconds}
        # Rounds that fit the cache even when every draft is kept.
        rounds = max(1, max_new // (model_config.num_depths + 1))
        parts = _round_parts(
            model, prompts, max_new, rounds, args.part_repeats, args.profile
        )
        record = dict(
            run=name,
            batch=batch,
            prompt_len=args.prompt_len,
            new_tokens=max_new,
            num_layers=model_config.num_layers,
            num_depths=model_config.num_depths,
            mtp_kind=model_config.mtp_kind,
            identical=identical,
            plain_tokens_per_second=rates["plain"],
            speculative_tokens_per_second=rates["spec"],
            speedup=_common.median(rates["spec"]) / _common.median(rates["plain"]),
            tokens_per_forward=spec.tokens_per_forward,
            acceptance=spec.acceptance,
            compile_seconds=compile_seconds,
            **parts,
        )
        records.append(record)
        print(
            f"{name} batch {batch}: plain {_common.median(rates['plain']):,.0f} tok/s, "
            f"speculative {_common.median(rates['spec']):,.0f} tok/s "
            f"({record['speedup']:.2f}×), {spec.tokens_per_forward:.2f} "
            "tokens/forward, "
            f"acceptance {[round(a, 3) for a in spec.acceptance]}, identical "
            f"{identical}",
            flush=True,
        )
        if "op_profiles" in parts:
            print(format_profiles(parts["op_profiles"]), flush=True)
    return dict(run=name, directory=run, records=records)


def train_tiny_run(directory: pathlib.Path) -> str:
    """Train a tiny run in `directory` (a corpus generated there, 3 steps on one
    device) and return its run directory."""
    from eqx_mtp.train import TrainConfig, train

    corpus = directory / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "lambda", "x", "y", "(", ")"]
    for i in range(40):
        text = " ".join(rng.choice(words, size=rng.integers(20, 60)))
        (corpus / f"doc{i:02d}.py").write_text(text + "\n")
    run = directory / "run"
    config = TrainConfig.from_dict(
        dict(
            data=str(corpus),
            run=str(run),
            steps=3,
            batch_size=4,
            seq_len=32,
            dim=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            mlp_dim=64,
            num_depths=2,
            warmup_steps=1,
            eval_fraction=0.25,
            eval_every=0,
            eval_batches=1,
            save_every=0,
            log_every=1,
            num_devices=1,
        )
    )
    train(config, progress=False)
    return str(run)


def doc_section(payload: dict, args) -> str:
    """The docs section: a row per run and batch, then the targets."""
    runs, seconds = payload["runs"], payload["seconds"]
    rows, targets = [], []
    for run in runs:
        for r in run["records"]:
            rows.append(
                [
                    run["run"],
                    f"{r['num_layers']} / {r['num_depths']}",
                    r["batch"],
                    spread(r["plain_tokens_per_second"], ",.0f"),
                    spread(r["speculative_tokens_per_second"], ",.0f"),
                    f"{r['speedup']:.2f}×",
                    f"{r['tokens_per_forward']:.2f}",
                    " ".join(f"{a:.2f}" for a in r["acceptance"]),
                    f"{1e3 * r['plain_step_seconds']:.3f}",
                    f"{1e3 * r['verify_seconds']:.3f} / {1e3 * r['draft_seconds']:.3f}"
                    f" / {1e3 * r['round_seconds']:.3f}",
                    f"{r['verify_seconds'] / r['plain_step_seconds']:.2f}× / "
                    f"{r['draft_seconds'] / r['plain_step_seconds']:.2f}× / "
                    f"{r['round_seconds'] / r['plain_step_seconds']:.2f}×",
                    "yes" if r["identical"] else "**no**",
                ]
            )
            if r["batch"] == 1 and run["run"] in TARGETS:
                limit = TARGETS[run["run"]]
                targets.append(
                    [f"{run['run']}, batch 1: speculative ≥ {limit}× plain",
                     f"{r['speedup']:.2f}×", "met" if r["speedup"] >= limit else
                     "missed"]
                )  # fmt: skip
            elif r["batch"] > 1:
                targets.append(
                    [f"{run['run']}, batch {r['batch']}: never slower than plain",
                     f"{r['speedup']:.2f}×", "met" if r["speedup"] >= 1 else
                     "missed"]
                )  # fmt: skip
            targets.append(
                [f"{run['run']}, batch {r['batch']}: greedy output identical",
                 "identical" if r["identical"] else "differs",
                 "met" if r["identical"] else "missed"]
            )  # fmt: skip
    table = _common.markdown_table(
        [
            "run",
            "layers / depths",
            "batch",
            "plain tok/s",
            "speculative tok/s",
            "speed-up",
            "tokens / forward",
            "acceptance per depth",
            "plain step ms",
            "verify / drafts / round ms",
            "… / plain step",
            "identical",
        ],
        rows,
    )
    profiles = [
        f"**{run['run']}, batch {r['batch']}**, per round:\n\n"
        + format_profiles(r["op_profiles"])
        for run in runs
        for r in run["records"]
        if "op_profiles" in r
    ]
    env = payload["environment"]
    command = "python benchmarks/decode.py " + " ".join(f"--run {r}" for r in args.run)
    report = "\n".join(
        [
            "## Decoding",
            "",
            f"`{command}` ({env['date']}, {env['device']}, {env['cpu_count']} cores, "
            f"load average {env['load_average']}, jax {env['jax']}, git "
            f"{env['git']}; {seconds / 60:.1f} min). Greedy decoding of held-out "
            f"prompts of {args.prompt_len} tokens up to each model's `max_seq_len`; "
            "tokens/s are medians (min–max) of "
            f"{args.repeats} interleaved calls after a warm-up, compilation apart. "
            "Parts of a round, per round inside a compiled loop of rounds (as "
            "`generate` runs them, less the prefill): `plain step`, the cached trunk "
            "pass over one token; `verify`, over `D + 1` tokens; `drafts`, the "
            "depths' drafting; `round`, all of a speculative round.",
            "",
            table,
            "",
            _common.markdown_table(["target", "measured", ""], targets),
            *(
                ["", "Operations of a round's parts (`--profile`):", ""]
                if profiles
                else []
            ),
            "\n\n".join(profiles),
        ]
    )
    return report


def main():
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        help="NAME=DIR of a trained run (repeatable; required unless --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1, short prompts, one repeat; without --run, on a tiny run "
        "trained first",
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part-repeats", type=int, default=20)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile each part of a round, op by op (JAX's profiler)",
    )
    parser.add_argument("--tag", default="", help="suffix of the results file")
    _common.add_run_flags(parser)
    args = parser.parse_args()
    if not args.run and not args.quick:
        parser.error("--run NAME=DIR is required (or --quick, which trains a tiny run)")
    _common.start(args)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.batches, args.prompt_len, args.repeats, args.part_repeats = [1], 8, 1, 1
    scratch = None
    if not args.run:
        if jax.process_count() > 1:
            sys.exit("decode.py --quick trains its tiny run in one process: give --run")
        scratch = tempfile.TemporaryDirectory(prefix="decode-quick-")
        print("no --run: training a tiny run first", flush=True)
        args.run = [f"tiny={train_tiny_run(pathlib.Path(scratch.name))}"]
    runs = []
    for item in args.run:
        name, _, directory = item.partition("=")
        if not directory:
            parser.error(f"--run takes NAME=DIR, got {item!r}")
        runs.append(measure(name, directory, args))
    if scratch is not None:
        scratch.cleanup()

    name = "decode" + (f"_{args.tag}" if args.tag else "")
    seconds = time.perf_counter() - started
    payload = dict(
        benchmark="decode",
        environment=_common.environment(),
        settings=dict(
            batches=args.batches,
            prompt_len=args.prompt_len,
            repeats=args.repeats,
            part_repeats=args.part_repeats,
        ),
        seconds=seconds,
        runs=runs,
    )
    report = doc_section(payload, args)
    print(f"\n{report}")
    _common.publish(name, payload, report, args)


if __name__ == "__main__":
    main()
