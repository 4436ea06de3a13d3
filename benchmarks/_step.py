"""The product's training step as the benchmarks run it: the optimizer and batch
`eqx-mtp train` builds, the arguments of its jitted body, and the models `mfu.py`
times (with the step cut into parts)."""

from __future__ import annotations

import dataclasses

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp
from eqx_mtp.train import TrainConfig, train_step
from eqx_mtp.train._job import job_optimizer


def step_arguments(optimizer, batch, weight, reduction, model, opt_state, mesh=None):
    """The arguments of `train_step`'s jitted, donating body, which the benchmarks
    lower and compile apart (`eqx_mtp.train._train_step._donating_train_step`, with
    no public name): what it keeps, then what it donates."""
    kept = (optimizer, batch, weight, reduction, mesh, eqx_mtp.DEFAULT_RULES)
    return kept, model, opt_state


def default_job() -> tuple[eqx_mtp.ModelConfig, TrainConfig]:
    """The model `eqx-mtp train` builds with its default flags, and those flags."""
    job = TrainConfig()
    return job.model, job


def larger_model(config: eqx_mtp.ModelConfig) -> eqx_mtp.ModelConfig:
    """Dim 512, 8 layers, rows of 1024, MLP width in the default's ratio (8/3, to a
    multiple of 64); the default's other settings."""
    return dataclasses.replace(
        config, dim=512, num_layers=8, mlp_dim=1408, max_seq_len=1024
    )


def make_batch(config: eqx_mtp.ModelConfig, batch: int, seq: int, seed: int = 0):
    """A `[1, batch, seq]` batch as the job feeds it: packed documents with their
    segment ids and positions."""
    tokens, segment_ids = _common.packed_rows(
        batch, seq, config.vocab_size, document_length=seq // 2, seed=seed
    )
    segments = np.asarray(segment_ids)
    starts = np.concatenate(
        [np.ones((batch, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1
    )
    index = np.broadcast_to(np.arange(seq), (batch, seq))
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = jnp.asarray(index - first, jnp.int32)
    return {
        k: v[None] for k, v in dict(tokens=tokens, segment_ids=segment_ids).items()
    } | dict(positions=positions[None])


@dataclasses.dataclass
class Case:
    """One benchmarked model: its step's state and what the step costs."""

    name: str
    config: eqx_mtp.ModelConfig
    batch_rows: int
    seq: int
    job: TrainConfig
    model: eqx.Module = None
    opt_state: object = None
    optimizer: object = None
    batch: dict = None

    def setup(self):
        job = self.job
        self.model = eqx_mtp.MTPModel(self.config, key=jax.random.key(job.run.seed))
        self.optimizer = job_optimizer(job, self.model)
        self.opt_state = self.optimizer.init(eqx.filter(self.model, eqx.is_array))
        self.batch = make_batch(self.config, self.batch_rows, self.seq)
        self.weight = np.asarray(float(job.objective.mtp_weight), np.float32)

    def step(self):
        self.model, self.opt_state, metrics = train_step(
            self.optimizer,
            self.model,
            self.opt_state,
            self.batch,
            self.weight,
            self.job.objective.reduction,
        )
        return jax.block_until_ready(metrics)

    def step_arguments(self):
        """The arguments of the jitted, donating body of `train_step`."""
        return step_arguments(
            self.optimizer, self.batch, self.weight, self.job.objective.reduction,
            self.model, self.opt_state,
        )  # fmt: skip


def part_programs(case: Case) -> dict:
    """The step cut into separately jitted parts, each forward + backward (as the step
    runs it, with its rematerialisation): the trunk from tokens to `h⁰`; the depths
    from `h⁰` (their blocks and `eh_proj`, their losses as a constant readout); every
    loss (the main head's and each depth's, from fixed hidden states); the optimizer
    update. Each takes the parameters and returns gradients, so nothing is dead code.
    """
    model, batch = case.model, case.batch
    tokens, segment_ids, positions = (
        batch[k][0] for k in ("tokens", "segment_ids", "positions")
    )
    params, static = eqx.partition(model, eqx.is_array)
    trunk, depths = model.trunk, model.depths

    def trunk_sum(trunk_params, cotangent):
        trunk = eqx.combine(trunk_params, eqx.partition(model.trunk, eqx.is_array)[1])
        h0 = jax.vmap(lambda t, s, p: trunk(t, positions=p, segment_ids=s))(
            tokens, segment_ids, positions
        )
        return jnp.sum(h0 * cotangent)

    h0 = jax.vmap(lambda t, s, p: trunk(t, positions=p, segment_ids=s))(
        tokens, segment_ids, positions
    )
    cotangent = jax.random.normal(jax.random.key(2), h0.shape, h0.dtype)

    def depth_hidden_sum(depth_params, h0):
        depths = eqx.combine(depth_params, eqx.partition(model.depths, eqx.is_array)[1])
        hiddens = eqx_mtp.scan_depths(
            depths,
            h0,
            tokens,
            embedding=trunk.embedding,
            final_norm=trunk.final_norm,
            readout=lambda k, normed: jnp.sum(normed * cotangent),
            segment_ids=segment_ids,
            positions=positions,
        )
        return jnp.sum(hiddens)

    def losses_sum(unembedding, hiddens):
        total = 0.0
        for k in range(hiddens.shape[0]):
            targets = jnp.roll(tokens, -(k + 1), axis=1).reshape(-1)
            where = jnp.ones(targets.shape, jnp.bool_)
            total = (
                total
                + eqx_mtp.head_loss_sum(
                    hiddens[k].reshape(-1, hiddens.shape[-1]),
                    unembedding,
                    targets,
                    where,
                    chunk_size=case.config.loss_chunk_size,
                    impl=case.config.loss_impl,
                )[0]
            )
        return total

    hiddens = jnp.stack([h0] * (1 + case.config.num_depths))
    grads = jax.tree.map(jnp.ones_like, params)

    def update(grads, opt_state, params):
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = case.optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    trunk_params = eqx.filter(trunk, eqx.is_array)
    depth_params = eqx.filter(depths, eqx.is_array)
    programs = dict(
        trunk=(jax.grad(trunk_sum), (trunk_params, cotangent)),
        depths=(jax.grad(depth_hidden_sum, argnums=(0, 1)), (depth_params, h0)),
        losses=(
            jax.grad(losses_sum, argnums=(0, 1)),
            (trunk.unembedding_matrix, hiddens),
        ),
        optimizer=(update, (grads, case.opt_state, params)),
    )

    def bound(fn, arguments):
        jitted = eqx.filter_jit(fn)
        return lambda: jitted(*arguments)

    return {name: bound(*program) for name, program in programs.items()}
