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
from ._generate import GenerateConfig, GeneratedText, generate_text
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
    defaults = GenerateConfig(run="")
    parser = commands.add_parser(
        "generate",
        help="continue prompts with a trained run's model",
        description="Greedy or sampled text from a run's newest checkpoint, the MTP "
        "depths drafting (self-speculative decoding) unless --no-speculative. Each "
        "prompt is encoded with the tokenizer the run trained with (bytes for a "
        "byte-level run), its continuation ends at the tokenizer's end-of-sequence "
        "or other stop ids and is printed as text; several prompts decode as one "
        "batch, each continuation under a '--- prompt N ---' line, the statistics "
        "once for the batch.",
    )
    parser.add_argument(
        "--run",
        help="run directory (default: the newest run under runs/ that holds a "
        "checkpoint)",
    )
    parser.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="a text to continue; repeat it for several",
    )
    parser.add_argument(
        "--prompts",
        dest="prompts_file",
        metavar="FILE",
        help="a file of prompts, after any --prompt: one per line (blank lines "
        "skipped), or a .jsonl file of objects with a 'prompt' string",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="encode and decode with this tokenizer (a tokenizer.json or a "
        "directory holding one) instead of the run's; needed for a run trained on "
        "token ids without a tokenizer",
    )
    parser.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="cut a prompt too long for the model from the left (its beginning-of-"
        "sequence token kept) to leave room for --max-new-tokens, instead of an "
        "error",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"tokens to generate per prompt (default: {defaults.max_new_tokens})",
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
        "Llama), MTP depths included, with the tokenizer files beside it: those "
        "of the tokenizer the run trained with, else of its --init-from checkpoint. "
        "Refuses to overwrite.",
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


def _print_generated(generated: GeneratedText) -> None:
    """Notes on standard error; the text of one prompt alone, or each prompt's
    under a header line; then the statistics."""
    for note in generated.notes:
        print(f"eqx-mtp generate: note: {note}", file=sys.stderr)
    several = len(generated.texts) > 1
    for number, text in enumerate(generated.texts, 1):
        if several:
            print(f"--- prompt {number} ---")
        print(text)
    for line in generated.statistics:
        print(line)


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
            _print_generated(generate_text(GenerateConfig(**args)))
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
