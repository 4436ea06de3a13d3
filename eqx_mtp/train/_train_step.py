"""One optimisation step: optimizer, exact gradient accumulation, parameter update."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from .._batch import PackedBatch
from .._loss import (
    check_batch,
    model_loss_sums,
    mtp_loss_sums,
    weighted_path_applies,
)
from .._mesh import check_batch_fits_mesh
from .._model import MTPModel, with_first_depths
from .._objective import DepthWeights, Objective, Reduction
from .._schedule import MTPWeight
from .._sharding import DEFAULT_RULES, ShardingRule, shard_tree

_NO_DECAY_NAMES = ("embedding", "unembedding")


def weight_decay_mask(model: MTPModel) -> PyTree[bool]:
    """`True` for the arrays AdamW should decay: every matrix except the token
    embedding/unembedding, and nothing inside a norm."""

    def decays(path, leaf) -> bool:
        names = [getattr(key, "name", "") for key in path]
        if any(name in _NO_DECAY_NAMES or name.endswith("norm") for name in names):
            return False
        return True

    params = eqx.filter(model, eqx.is_array)
    return jax.tree_util.tree_map_with_path(decays, params)


def _parameter_groups(params: PyTree) -> PyTree[str]:
    """`"depths"` for the arrays under the model's `depths`, `"trunk"` for the rest."""

    def group(path, _) -> str:
        return "depths" if getattr(path[0], "name", "") == "depths" else "trunk"

    return jax.tree_util.tree_map_with_path(group, params)


def make_optimizer(
    model: MTPModel,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    min_learning_rate_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    depth_grad_clip: float | None = None,
    b1: float = 0.9,
    b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, global-norm clipping, and weight
    decay only where [`eqx_mtp.train.weight_decay_mask`][] says.

    **Arguments:**

    - `model`: the model to optimise; its `config.train_depths_only` decides whether
        the trunk learns.
    - `learning_rate`: the peak learning rate, reached after `warmup_steps` and decayed
        along a cosine to `learning_rate * min_learning_rate_ratio` at `total_steps`.
    - `weight_decay`, `b1`, `b2`: AdamW's.
    - `grad_clip`: the largest global norm of the gradients (of the trunk's alone when
        `depth_grad_clip` is given).
    - `depth_grad_clip`: `None` clips all gradients together by `grad_clip`; a float
        clips the depths' gradients by their own global norm to this value, as a group
        apart from the trunk's (as Megatron clips its MTP gradients).

    **Returns:**

    An optax transformation. With `train_depths_only` the trunk (embedding, blocks,
    final norm, unembedding) is left exactly as it is: its updates are zero, with no
    weight decay, and the state holds no moments for it. Without it, and with
    `depth_grad_clip=None`, the state has the structure it always had, so existing
    checkpoints restore into it.
    """
    if depth_grad_clip is not None and not depth_grad_clip > 0:
        raise ValueError(
            "make_optimizer: depth_grad_clip must be None or > 0, got "
            f"{depth_grad_clip}"
        )
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=max(warmup_steps, 0),
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * min_learning_rate_ratio,
    )
    adamw = optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        weight_decay=weight_decay,
        mask=weight_decay_mask(model),
    )
    if model.config.train_depths_only:
        # The trunk's gradients are zero already, but AdamW's decoupled weight decay
        # would still move its matrices: the trunk gets no update and no state.
        depth_clip = grad_clip if depth_grad_clip is None else depth_grad_clip
        return optax.multi_transform(
            dict(
                trunk=optax.set_to_zero(),
                depths=optax.chain(optax.clip_by_global_norm(depth_clip), adamw),
            ),
            # A function, not a tree of labels: optax would call the `MTPModel`.
            _parameter_groups,
        )
    if depth_grad_clip is None:
        clip = optax.clip_by_global_norm(grad_clip)
    else:
        clip = optax.multi_transform(
            dict(
                trunk=optax.clip_by_global_norm(grad_clip),
                depths=optax.clip_by_global_norm(depth_grad_clip),
            ),
            # A function, not a tree of labels: optax would call the `MTPModel`.
            _parameter_groups,
        )
    return optax.chain(clip, adamw)


def accumulated_loss_and_grad(
    model: MTPModel,
    batch: dict[str, Int[Array, "micro batch seq"] | Bool[Array, "micro batch seq"]],
    *,
    mtp_weight: MTPWeight,
    reduction: Reduction = "mean",
    loss_sums_fn: Callable = mtp_loss_sums,
    mesh: Mesh | None = None,
    depth_weights: DepthWeights | None = None,
    active_depths: int | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], dict[str, Array], PyTree]:
    """Loss and gradient of a batch split into micro-batches, equal to those of the
    whole batch at once.

    The loss is linear in the per-depth sums once the counts are fixed, and the counts
    depend only on the batch, so they are reduced over every micro-batch first; each
    micro-batch then contributes `Σ_k c_k ∇S_k` with `c_k = ∂L/∂S_k` at the global
    counts. No normalised mean is ever added to an unnormalised sum.

    **Arguments:**

    - `model`: the model.
    - `batch`: `tokens` and optional `segment_ids`, `positions`, `loss_mask`, each
        `[micro_batches, rows, seq]`.
    - `mtp_weight`, `reduction`, `depth_weights`, `step`: as for
        [`eqx_mtp.reduce_losses`][] (`step` evaluates a schedule `mtp_weight`).
    - `active_depths`: run only the first `active_depths` depths (`0 …
        num_depths`; `None`: all of them), as a depth curriculum does (see
        [`eqx_mtp.DepthSchedule`][]): the loss is that of the model without the
        others, which are not computed and get a zero gradient. `depth_weights`, if
        given, must weigh the depths beyond them 0 (they weigh the first
        `active_depths` depths, which may include depths of weight 0); absent, the
        depths that run weigh the same. A static number: each value compiles once.
    - `loss_sums_fn`: `(model, tokens, *, segment_ids, positions, loss_mask) ->
        (loss_sums, token_counts)`, by default [`eqx_mtp.mtp_loss_sums`][]; it also
        gets `mesh=` when a mesh is given and `key=` when a key is. With
        `active_depths`, the model it gets has only the depths that run. The
        default with the fused loss and no mesh computes the same sums with the
        `c_k` known in its forward pass, so the unembedding's gradient is
        accumulated there in one `[vocab, dim]` array for the main head and all
        depths (see [`eqx_mtp.mtp_loss`][]).
    - `mesh`: optional mesh from [`eqx_mtp.make_mesh`][]: every micro-batch is laid
        out rows over `data` and sequence over `context` and its loss computed as
        [`eqx_mtp.mtp_loss_sums`][] does on a mesh. The counts are global before the
        first micro-batch, so the result is the same on any mesh.
    - `key`: optional PRNG key for randomness in the depths' layers (e.g. dropout),
        split into one key per micro-batch (`jax.random.split(key, micro_batches)`),
        each used as [`eqx_mtp.mtp_loss_sums`][] uses its `key`. `None` is
        deterministic.

    **Returns:**

    `(loss, aux, grads)` with `aux` as [`eqx_mtp.reduce_losses`][] returns it
    (`[num_depths + 1]` arrays; with `active_depths`, the `loss_sums` and
    `depth_losses` of the depths that did not run are NaN: not computed).
    """
    micro_batches, token_counts = _micro_batches(model, batch, mesh)
    num_depths = model.config.num_depths
    running = check_active_depths(model, active_depths, depth_weights)
    counts = token_counts
    if running < num_depths:
        counts = token_counts[: running + 1]
        if depth_weights is not None:
            depth_weights = jnp.asarray(depth_weights, jnp.float32)[:running]
    objective = Objective(mtp_weight, reduction, depth_weights)
    coefficients = objective.coefficients(counts, step)
    num_micro = batch["tokens"].shape[0]
    micro_keys = None if key is None else jax.random.split(key, num_micro)
    surrogate = _surrogate(loss_sums_fn, coefficients, model, mesh, running)
    grad_fn = eqx.filter_grad(surrogate, has_aux=True)
    params, static = eqx.partition(model, eqx.is_array)

    def accumulate(carry, xs):
        grads_sum, sums_sum = carry
        grads, sums = grad_fn(eqx.combine(params, static), *xs)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, sums_sum + sums), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_sums = jnp.zeros(running + 1, jnp.float32)
    (grads, loss_sums), _ = jax.lax.scan(
        accumulate, (zero_grads, zero_sums), (micro_batches, micro_keys)
    )
    loss, aux = objective.reduce(loss_sums, counts, step)
    if running < num_depths:
        aux = _with_depths_not_run(aux, token_counts)
    return loss, aux, grads


def _with_depths_not_run(aux: dict, token_counts: Array) -> dict:
    """`aux` of the depths that ran, with the batch's counts of every depth and NaN
    for the sums and losses of the depths that did not run."""
    missing = token_counts.shape[0] - aux["loss_sums"].shape[0]
    not_run = jnp.full(missing, jnp.nan, jnp.float32)
    return dict(
        aux,
        token_counts=token_counts,
        loss_sums=jnp.concatenate([aux["loss_sums"], not_run]),
        depth_losses=jnp.concatenate([aux["depth_losses"], not_run]),
    )


def check_active_depths(
    model: MTPModel, active_depths: int | None, depth_weights: DepthWeights | None
) -> int:
    """How many depths run (all for `None`), after checking `active_depths` against
    the model and concrete `depth_weights` (a depth beyond them must weigh 0)."""
    num_depths = model.config.num_depths
    if active_depths is None:
        return num_depths
    if (
        not isinstance(active_depths, int | np.integer)
        or isinstance(active_depths, bool)
        or not 0 <= active_depths <= num_depths
    ):
        raise ValueError(
            f"active_depths must be an integer in [0, num_depths={num_depths}], got "
            f"{active_depths!r}"
        )
    active_depths = int(active_depths)
    if depth_weights is None:
        return active_depths
    try:
        weights = np.asarray(depth_weights, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return active_depths  # traced values cannot be checked here
    if weights.shape != (num_depths,):
        raise ValueError(
            f"depth_weights must have shape ({num_depths},), one weight per MTP "
            f"depth, got {weights.shape}"
        )
    if np.any(weights[active_depths:] != 0) or (
        active_depths and not np.sum(weights[:active_depths]) > 0
    ):
        raise ValueError(
            f"depth_weights must weigh the depths beyond active_depths={active_depths}"
            f" 0 and those up to it with a positive sum, got {weights.tolist()}"
        )
    return active_depths


def _micro_batches(model, batch, mesh) -> tuple[PackedBatch, Array]:
    """The checked records of the micro-batches (each array `[micro_batches, …]`)
    and the token counts of them all."""
    tokens = batch["tokens"]
    if getattr(tokens, "ndim", None) != 3:
        raise ValueError(
            "batch['tokens'] must have shape [micro_batches, rows, seq], got shape "
            f"{getattr(tokens, 'shape', None)}"
        )
    if mesh is not None:
        check_batch_fits_mesh(mesh, tokens.shape, name="batch['tokens']")
    rows = {name: batch.get(name) for name in ("segment_ids", "positions", "loss_mask")}
    # Checked on all the rows at once (a reshape that nothing computes from); the
    # records are built per micro-batch, so no array changes its layout.
    check_batch(
        model,
        _flat(tokens),
        mesh=mesh,
        **{name: None if x is None else _flat(x) for name, x in rows.items()},
    )
    micro_batches = jax.vmap(PackedBatch.unchecked)(tokens, *rows.values())
    counts = jax.vmap(lambda b: b.valid_token_counts(model.config.num_depths))(
        micro_batches
    )
    return micro_batches, jnp.sum(counts, axis=0)


def _flat(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1])


def _surrogate(loss_sums_fn, coefficients, model, mesh, running):
    """`(model, micro_batch, key) -> (Σ_k c_k S_k, loss_sums)`, whose gradient is the
    micro-batch's share of the loss's; only the first `running` depths run."""
    if loss_sums_fn is mtp_loss_sums and weighted_path_applies(model.config, mesh):
        # The library's own sums take the weighted path where it applies: the
        # unembedding's gradient is accumulated in the forward pass, once for all
        # depths.
        def weighted(m, micro, key):
            m = with_first_depths(m, running)
            total, sums, _ = model_loss_sums(m, micro, None, key, coefficients)
            return total, jax.lax.stop_gradient(sums)

        return weighted

    def surrogate(m, micro, key):
        # Sliced inside the differentiated function: the depths left out get zeros.
        m = with_first_depths(m, running)
        if loss_sums_fn is mtp_loss_sums:
            sums, _ = model_loss_sums(m, micro, mesh, key)
        else:
            options = {} if mesh is None else dict(mesh=mesh)
            if key is not None:
                options["key"] = key
            sums, _ = loss_sums_fn(
                m,
                micro.tokens,
                segment_ids=micro.documents,
                positions=micro.positions,
                loss_mask=micro.loss_mask,
                **options,
            )
        return jnp.dot(coefficients, sums), sums

    return surrogate


def train_step(
    optimizer: optax.GradientTransformation,
    model: MTPModel,
    opt_state: PyTree,
    batch: dict[str, Array],
    mtp_weight: MTPWeight,
    reduction: Reduction = "mean",
    mesh: Mesh | None = None,
    rules: tuple[ShardingRule, ...] = DEFAULT_RULES,
    *,
    depth_weights: DepthWeights | None = None,
    active_depths: int | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[MTPModel, PyTree, dict[str, Array]]:
    """One optimizer step on a `[micro_batches, rows, seq]` batch; returns the new
    model, optimizer state and the loss metrics (with the gradient's global norm).

    The model's and the optimizer state's buffers are donated (their updated values
    take their memory), so use the returned ones; the batch and `mtp_weight` are not,
    and may be passed again. With a `mesh`, the loss is computed as
    [`eqx_mtp.train.accumulated_loss_and_grad`][] does on it, and the gradients, the new
    parameters and the new optimizer state are laid out by `rules`
    ([`eqx_mtp.partition_specs`][]), as the model and state passed in should be
    ([`eqx_mtp.shard_tree`][]).

    `mtp_weight` (λ, or a schedule of `step`), `reduction`, `depth_weights`, `step`
    and the dropout `key` are those of [`eqx_mtp.mtp_loss`][]; the key is split per
    micro-batch (see [`eqx_mtp.train.accumulated_loss_and_grad`][]).

    `active_depths` (a depth curriculum's stage, see [`eqx_mtp.DepthSchedule`][]):
    only the first `active_depths` depths run, as in
    [`eqx_mtp.train.accumulated_loss_and_grad`][]; `None` runs all. It is static
    (one program per value), the weights are not. The depths that get no gradient —
    those beyond `active_depths`, and parallel depths of weight 0 — are left
    exactly as they were, parameters and optimizer state alike (no weight decay,
    no momentum): switched on again, a depth starts from where it stopped. The
    optimizer's step count still advances, so a depth first switched on late takes
    Adam's first steps without their bias correction (smaller, for a few steps).
    """
    if not (eqx.is_array(mtp_weight) or callable(mtp_weight)):
        # A Python float would be static under `jit`: one program per value.
        mtp_weight = np.asarray(mtp_weight, np.float32)
    if step is not None and not eqx.is_array(step):
        step = np.asarray(step, np.int32)
    options = dict(depth_weights=depth_weights, step=step, key=key)
    if active_depths is not None:
        options["active_depths"] = check_active_depths(
            model, active_depths, depth_weights
        )
        if depth_weights is not None and not eqx.is_array(depth_weights):
            # Traced, so that a change of weights within a stage compiles nothing.
            options["depth_weights"] = np.asarray(depth_weights, np.float32)
    kept = (optimizer, batch, mtp_weight, reduction, mesh, rules, options)
    return _donating_train_step(kept, model, opt_state)


# Equinox donates every argument but the first: what must survive the call goes
# there. Donating the batch never saved memory anyway: no output has its shapes, so
# XLA could not reuse its buffers.
@eqx.filter_jit(donate="all-except-first")
def _donating_train_step(kept, model, opt_state):
    optimizer, batch, mtp_weight, reduction, mesh, rules, *options = kept
    loss, aux, grads = accumulated_loss_and_grad(
        model,
        batch,
        mtp_weight=mtp_weight,
        reduction=reduction,
        mesh=mesh,
        **(options[0] if options else {}),
    )
    if mesh is not None:
        grads = shard_tree(grads, mesh, rules=rules)
    params = eqx.filter(model, eqx.is_array)
    # optax mixes Python floats with int32 step counts; our own code stays strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    trained = _trained_depths(model, options[0] if options else {})
    if trained is not None:
        new_model = keep_untrained_depths(new_model, model, trained)
        new_opt_state = keep_untrained_depths(new_opt_state, opt_state, trained)
    model, opt_state = new_model, new_opt_state
    if mesh is not None:
        model = shard_tree(model, mesh, rules=rules)
        opt_state = shard_tree(opt_state, mesh, rules=rules)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return model, opt_state, metrics


def _trained_depths(model: MTPModel, options: dict) -> Array | None:
    """`[num_depths]`: which depths get a gradient under `options`' `active_depths`
    (`None` when every depth may)."""
    running = options.get("active_depths")
    num_depths = model.config.num_depths
    parallel = model.config.mtp_kind == "parallel"
    weights = options.get("depth_weights")
    if running is None or (running == num_depths and (not parallel or weights is None)):
        return None
    trained = jnp.arange(num_depths) < running
    if parallel and weights is not None:
        # A parallel depth reads the trunk only: weight 0 gives it no gradient.
        trained = trained & (jnp.asarray(weights) > 0)
    return trained


def keep_untrained_depths(new: PyTree, old: PyTree, trained: Array) -> PyTree:
    """`new` (a model, or an optimizer state holding trees shaped like the model)
    with the slices of the depths `trained` leaves out, and the shared depth layer
    when no depth trains, taken from `old`."""

    def select(condition):
        def pick(a, b):
            if not eqx.is_array(a):
                return a
            if condition.ndim and (a.ndim == 0 or a.shape[0] != condition.shape[0]):
                return a  # not stacked by depth (a factored optimizer statistic)
            mask = condition.reshape(condition.shape + (1,) * (a.ndim - condition.ndim))
            return jnp.where(mask, a, b)

        return pick

    def per_model(a, b):
        if not isinstance(a, MTPModel) or a.depths is None:
            return a
        depths = jax.tree.map(select(trained), a.depths.depths, b.depths.depths)
        shared = jax.tree.map(
            select(jnp.any(trained)), a.depths.shared_layer, b.depths.shared_layer
        )
        return eqx.tree_at(
            lambda m: (m.depths.depths, m.depths.shared_layer),
            a,
            (depths, shared),
            is_leaf=lambda x: x is None,
        )

    is_model = lambda x: isinstance(x, MTPModel)  # noqa: E731
    return jax.tree.map(per_model, new, old, is_leaf=is_model)
