"""What the job runs on and reads: the device mesh, checked against the batch, and
the training and held-out batches, checked against the model."""

from __future__ import annotations

import pathlib

import jax
from jax.sharding import Mesh

from .._mesh import batch_sharding, make_mesh
from ._config import TrainConfig, UserError
from ._data import (
    ByteTokenizer,
    DataError,
    TrainBatches,
    eval_batches,
    is_token_corpus,
    load_documents,
    max_token_id,
    split_documents,
)
from ._distributed import process_box
from ._framing import Framed
from ._text_tokenizer import TOKENIZER_FILE, TextTokenizer, TokenizerError


def job_mesh(config: TrainConfig) -> Mesh:
    """The mesh of `--mesh` over the devices the job may use, checked to divide the
    batch and the rows."""
    devices = jax.devices()
    num_devices = config.mesh.num_devices
    if num_devices is not None:
        if jax.process_count() > 1:
            raise UserError("--num-devices is for single-process runs")
        if num_devices > len(devices):
            raise UserError(
                f"--num-devices={num_devices}, but there are {len(devices)}"
            )
        devices = devices[:num_devices]
    try:
        mesh = make_mesh(**config.mesh.axis_sizes(), devices=devices)
    except ValueError as error:
        raise UserError(f"--mesh: {error}".replace("make_mesh: ", "")) from None
    _check_batch_fits(config, mesh)
    return mesh


def _check_batch_fits(config: TrainConfig, mesh: Mesh) -> None:
    data = config.data
    rows = data.batch_size // data.micro_batches
    if rows % mesh.shape["data"]:
        raise UserError(
            f"--batch-size={data.batch_size} / --micro-batches={data.micro_batches} "
            f"= {rows} rows per micro-batch cannot be split over the mesh's data "
            f"axis of size {mesh.shape['data']}"
        )
    if data.seq_len % mesh.shape["context"]:
        raise UserError(
            f"--seq-len={data.seq_len} cannot be split over the mesh's context axis "
            f"of size {mesh.shape['context']}"
        )


def job_tokenizer(config: TrainConfig) -> Framed | None:
    """What encodes the job's text: `--tokenizer`, else the `--init-from`
    checkpoint's tokenizer (`None` when it has none), else bytes."""
    path, flag = config.data.tokenizer, "--tokenizer"
    if path is None and config.init_from is not None:
        path, flag = config.init_from, "--init-from"
        if not (pathlib.Path(path) / TOKENIZER_FILE).is_file():
            return None
    if path is None:
        return ByteTokenizer()
    try:
        tokenizer = TextTokenizer.load(path)
    except TokenizerError as error:
        raise UserError(f"{flag}: {error}") from None
    vocab_size = config.model.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"{flag}: the tokenizer {path} knows {tokenizer.vocab_size} ids, more "
            f"than the model's vocabulary of {vocab_size}"
        )
    return tokenizer


def _check_corpus_fits_model(
    documents, config: TrainConfig, tokenizer: Framed | None
) -> None:
    tokens = is_token_corpus(documents)
    if tokenizer is None and not tokens:
        raise UserError(
            f"--tokenizer: --init-from {config.init_from} holds no {TOKENIZER_FILE} "
            "to encode the text of --data; name a tokenizer, or give --data as a "
            ".jsonl file with a 'tokens' list per line"
        )
    if isinstance(tokenizer, ByteTokenizer) and tokens:
        raise UserError(
            "--data holds token ids ('tokens' fields), which only a model with a "
            "tokenizer (--init-from or --tokenizer) reads; the byte-level model "
            "reads text"
        )
    largest = max_token_id(documents)
    if tokens and largest >= config.model.vocab_size:
        raise UserError(
            f"--data: token id {largest} is outside the model's vocabulary of "
            f"{config.model.vocab_size}"
        )


def job_data(
    config: TrainConfig, mesh: Mesh, tokenizer: Framed | None
) -> tuple[TrainBatches, list]:
    """This process's training batches and the held-out batches, their text encoded
    by `tokenizer` (see `job_tokenizer`)."""
    try:
        documents = load_documents(config.data.path)
    except DataError as error:
        raise UserError(f"--data: {error}") from None
    _check_corpus_fits_model(documents, config, tokenizer)
    try:
        train_docs, held_out = split_documents(
            documents, eval_fraction=config.data.eval_fraction, seed=config.run.seed
        )
    except DataError:
        raise UserError(
            f"--data {config.data.path or '(the standard library)'}: holds "
            f"{len(set(documents))} distinct document(s), too few to hold some out "
            "for evaluation; give at least 2 (in a .txt, separate documents by a "
            "blank line; or give a directory of files)"
        ) from None
    data = config.data
    batch_shape = (data.micro_batches, data.batch_size // data.micro_batches)
    _, local_rows, local_columns = process_box(
        batch_sharding(mesh, 3), batch_shape + (data.seq_len,)
    )
    batches = TrainBatches(
        train_docs,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        seed=config.run.seed,
        rows=[
            m * batch_shape[1] + row
            for m in range(data.micro_batches)
            for row in range(local_rows.start, local_rows.stop)
        ],
        columns=local_columns,
        tokenizer=tokenizer,
    )
    evaluation = eval_batches(
        held_out, seq_len=data.seq_len, batch_size=data.batch_size, tokenizer=tokenizer
    )[: max(config.run.eval_batches, 1)]
    return batches, evaluation
