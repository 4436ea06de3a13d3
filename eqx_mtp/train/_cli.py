"""The `eqx-mtp` command line: `eqx-mtp train` and `eqx-mtp generate`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ._checkpoint import CheckpointError
from ._data import DataError
from ._generate import GenerateConfig, generate_text
from ._job import TrainConfig, UserError, load_config_file, train
from ._preemption import EXIT_PREEMPTED, Preempted

_HELP = {
    "data": "a directory of text files, a .txt or a .jsonl (field 'text', or "
    "'tokens' for token ids with --init-from); default: the .py files of this "
    "Python's standard library",
    "init_from": "start from a Hugging Face Llama-family checkpoint directory "
    "(config.json + safetensors); --data then holds token ids",
    "train_depths_only": "freeze the trunk: only the MTP depths learn",
    "depth_grad_clip": "clip the depths' gradients by their own global norm, apart "
    "from the trunk's; unset: one clip over all gradients",
    "run": "run directory (default runs/<timestamp>)",
    "resume": "must continue a checkpoint (of --run, default the newest run under "
    "runs/); without it, --run DIR continues DIR's newest checkpoint if it holds one "
    "and starts fresh if not",
    "mtp_weight": "λ: a float, or a schedule '0.3@0,0.1@800'",
    "micro_batches": "gradient accumulation: split each batch into this many parts",
    "mesh": "device mesh, e.g. 'data=4,model=2,context=1' (default: every device "
    "on data)",
    "attention_impl": "reference, blockwise (memory linear in the row length), auto, "
    "pallas_gpu or splash_tpu",
    "compute_dtype": "float32 or bfloat16: dtype of the trunk's and depths' matmuls "
    "and activations; parameters, gradients and losses stay float32",
    "num_devices": "use only the first N devices (single-process runs)",
    "coordinator": "HOST:PORT of process 0, for a multi-process run",
    "num_processes": "number of processes of a multi-process run",
    "process_id": "this process's index in a multi-process run",
    "distributed": "join a multi-process run whose peers JAX detects (TPU pod, SLURM)",
}


# Number fields whose default is None, so their type is not the default's.
_OPTIONAL_NUMBERS = {
    "max_seq_len": int,
    "num_devices": int,
    "num_processes": int,
    "process_id": int,
    "depth_grad_clip": float,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqx-mtp", description="Multi-Token Prediction training for JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="train a byte-level MTP model",
        argument_default=argparse.SUPPRESS,
    )
    train_parser.add_argument(
        "--config", help="a JSON or TOML file of the fields below"
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = _HELP.get(field.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            train_parser.add_argument(
                flag, action="store_true", dest=field.name, help=help_text
            )
        elif field.name in _OPTIONAL_NUMBERS:
            train_parser.add_argument(
                flag,
                type=_OPTIONAL_NUMBERS[field.name],
                dest=field.name,
                help=help_text,
            )
        elif default is None or isinstance(default, str):
            train_parser.add_argument(flag, type=str, dest=field.name, help=help_text)
        else:
            train_parser.add_argument(
                flag, type=type(default), dest=field.name, help=help_text
            )
    train_parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar"
    )
    _add_generate_parser(commands)
    return parser


def _add_generate_parser(commands) -> None:
    defaults = GenerateConfig(run="", prompt="")
    parser = commands.add_parser(
        "generate",
        help="continue a prompt with a trained run's model",
        description="Greedy or sampled text from a run's newest checkpoint, the MTP "
        "depths drafting (self-speculative decoding) unless --no-speculative.",
    )
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"tokens to generate (default: {defaults.max_new_tokens})",
    )
    parser.add_argument(
        "--no-speculative",
        dest="speculative",
        action="store_false",
        help="decode with the trunk alone",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="0 for greedy decoding (default), > 0 to sample",
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among these")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="sampling seed (default: 0)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: newest)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `eqx-mtp`; returns the process exit code."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "train":
            progress = not args.pop("no_progress", False)
            values = {}
            config_file = args.pop("config", None)
            if config_file is not None:
                values.update(load_config_file(config_file))
            values.update(args)
            train(TrainConfig(**values), progress=progress)
        elif command == "generate":
            text, statistics = generate_text(GenerateConfig(**args))
            print(text)
            for line in statistics:
                print(line)
    except (UserError, DataError, CheckpointError) as error:
        print(f"eqx-mtp {command}: error: {error}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        print(f"eqx-mtp {command}: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"eqx-mtp {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
