"""The `eqx-mtp` command line: `eqx-mtp train`, `eqx-mtp generate` and
`eqx-mtp export`."""

from __future__ import annotations

import argparse
import sys

from ._checkpoint import CheckpointError
from ._config import TrainConfig, UserError
from ._data import DataError
from ._export import DTYPES, ExportConfig, export_run
from ._flags import add_train_flags, load_config_file
from ._generate import GenerateConfig, generate_text
from ._job import train
from ._preemption import EXIT_PREEMPTED, Preempted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqx-mtp", description="Multi-Token Prediction training for JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="train a byte-level MTP model",
        description="Train an MTP model, or continue a run from its newest "
        "checkpoint. Flags override the fields of --config.",
        argument_default=argparse.SUPPRESS,
    )
    train_parser.add_argument(
        "--config",
        help="a JSON or TOML file of the fields below, nested by section as the run "
        'directory\'s config.json, or flat ({"steps": 300, "dim": 192})',
    )
    train_parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar"
    )
    add_train_flags(train_parser)
    _add_generate_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_generate_parser(commands) -> None:
    defaults = GenerateConfig(run="", prompt="")
    parser = commands.add_parser(
        "generate",
        help="continue a prompt with a trained run's model",
        description="Greedy or sampled text from a run's newest checkpoint, the MTP "
        "depths drafting (self-speculative decoding) unless --no-speculative.",
    )
    parser.add_argument(
        "--run",
        help="run directory (default: the newest run under runs/ that holds a "
        "checkpoint)",
    )
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


def _add_export_parser(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="write a run's model as a Hugging Face checkpoint",
        description="Write a run's model (its newest checkpoint, or --step) in the "
        "Hugging Face layout of the family it started from (a byte-level run as "
        "Llama), MTP depths included, with the tokenizer files of its --init-from "
        "checkpoint beside it. Refuses to overwrite.",
    )
    parser.add_argument(
        "--run",
        help="run directory (default: the newest run under runs/ that holds a "
        "checkpoint)",
    )
    parser.add_argument(
        "--to", required=True, help="directory to write (absent or empty)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: newest)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help=f"dtype of the written weights: {' or '.join(DTYPES)} (default: float32)",
    )
    parser.add_argument(
        "--family",
        default=None,
        help="Hugging Face family to write (default: the one the run started from, "
        "or the plainest that holds the trunk)",
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
            train(TrainConfig.from_dict(values), progress=progress)
        elif command == "generate":
            text, statistics = generate_text(GenerateConfig(**args))
            print(text)
            for line in statistics:
                print(line)
        elif command == "export":
            for line in export_run(ExportConfig(**args)):
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
