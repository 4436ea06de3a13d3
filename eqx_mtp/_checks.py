"""Input checks shared by the public functions of the loss path.

Every error names the function and the argument, says what was expected and what was
got. Shapes and dtypes are static, so they are checked always, under `jit` too, at no
cost to the compiled program. Values (ids within the vocabulary) are checked only on
concrete arrays, on the host, and never under tracing: nothing is added to a traced
program, and a jitted training step pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NORM_HINT = (
    "final_norm must be a per-vector norm, mapping a [dim] array to a [dim] array "
    "(as eqx.nn.RMSNorm(dim) and eqx.nn.LayerNorm(dim) do), or a norm over the last "
    "axis of [batch, seq, dim] arrays"
)


def _at(fn: str | None) -> str:
    return f"{fn}: " if fn else ""


def _layout(axes: list[str]) -> str:
    return "[" + ", ".join(axes) + "]"


def describe(value) -> str:
    """`int32[2, 8]` for an array, the `repr` of anything else."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype}{list(value.shape)}"
    return repr(value)


def is_concrete(value) -> bool:
    """Whether `value` holds values this process can read: not a tracer, and not an
    array split over other processes."""
    if isinstance(value, jax.core.Tracer):
        return False
    return getattr(value, "is_fully_addressable", True)


def _array_shape(fn: str | None, name: str, value, layout: str) -> tuple[int, ...]:
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(
            f"{_at(fn)}{name} must be an array of shape {layout}, got "
            f"{type(value).__name__}"
        )
    return tuple(value.shape)


class Shapes:
    """Sizes of named axes, each bound by the first argument that has it and checked
    against every later one (the order in which jaxtyping binds them, so that both
    blame the same argument).

    `Shapes(fn).check(name, value, "batch seq dim")` checks the rank of `value`, its
    sizes against those already bound, and binds the new ones; a trailing `...`
    admits any further axes.
    """

    def __init__(self, fn: str | None):
        self.fn = fn
        self.sizes: dict[str, tuple[int, str]] = {}

    def bind(self, axis: str, size: int, source: str) -> None:
        """Bind `axis` to `size`, as given by `source`, unless it is bound already."""
        self.sizes.setdefault(axis, (size, source))

    def check(self, name: str, value, layout: str) -> tuple[int, ...]:
        axes = layout.split()
        shape = _array_shape(self.fn, name, value, _layout(axes))
        variadic = axes[-1] == "..."
        named = axes[:-1] if variadic else axes
        if len(shape) < len(named) or (not variadic and len(shape) > len(named)):
            raise ValueError(
                f"{_at(self.fn)}{name} must have shape {_layout(axes)}, got shape "
                f"{shape}"
            )
        wrong = [
            f"{axis} = {self.sizes[axis][0]} as in {self.sizes[axis][1]}"
            for axis, size in zip(named, shape)
            if axis in self.sizes and self.sizes[axis][0] != size
        ]
        if wrong:
            raise ValueError(
                f"{_at(self.fn)}{name} must have shape {_layout(axes)} with "
                f"{', '.join(wrong)}, got shape {shape}"
            )
        for axis, size in zip(named, shape):
            self.bind(axis, size, name)
        return shape


def check_same_shape(
    fn: str | None, name: str, value, shape: tuple[int, ...], *, like: str
) -> None:
    """`value` must have the shape `shape` of the argument `like`."""
    got = _array_shape(fn, name, value, f"{shape}")
    if got != tuple(shape):
        raise ValueError(
            f"{_at(fn)}{name} must have the shape of {like} {tuple(shape)}, got {got}"
        )


def check_float(fn: str | None, name: str, value) -> None:
    """`value` must hold floating-point numbers."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"{_at(fn)}{name} must be a floating-point array, got {value.dtype}"
        )


def check_mask(fn: str | None, name: str, value) -> None:
    """`value` must be boolean. An integer mask is refused, not read as `!= 0`: one
    that holds segment ids (1, 2, 3, as MaxText's target masks do) would otherwise be
    counted as weights by whoever sums it."""
    if value.dtype != jnp.bool_:
        maxtext = (
            "; a MaxText decoder_target_mask is also target-indexed: convert it "
            "with eqx_mtp.interop.maxtext_loss_mask"
            if name == "loss_mask"
            else ""
        )
        raise TypeError(
            f"{_at(fn)}{name} must be a boolean array (pass {name} != 0), got "
            f"{value.dtype}{maxtext}"
        )


def check_ids(
    fn: str | None,
    name: str,
    value,
    *,
    vocab_size: int | None = None,
    vocab_of: str | None = None,
    where=None,
) -> None:
    """`value` must hold integer ids; with `vocab_size`, ids in `[0, vocab_size)` (the
    rows of the argument `vocab_of`) wherever `where` is true, checked when both are
    concrete."""
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{_at(fn)}{name} must be an integer array, got {value.dtype}")
    if vocab_size is None or value.size == 0:
        return
    if not is_concrete(value) or (where is not None and not is_concrete(where)):
        return
    ids = np.asarray(value)
    if where is not None:
        ids = ids[np.asarray(where)]
        if ids.size == 0:
            return
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        source = "" if vocab_of is None else f" (the rows of {vocab_of})"
        counted = "" if where is None else " at the counted positions"
        raise ValueError(
            f"{_at(fn)}{name} must hold ids in [0, {vocab_size}){source}{counted}, "
            f"got ids from {low} to {high}"
        )


def check_segment_ids(fn: str | None, name: str, value) -> None:
    """`value` must hold integer segment ids: `0` for padding, a positive id for a
    document; a negative id is refused where the values are concrete."""
    check_ids(fn, name, value)
    if value.size == 0 or not is_concrete(value):
        return
    low = np.asarray(value).min()
    if low < 0:
        raise ValueError(
            f"{_at(fn)}{name} must hold ids >= 0 (0 for padding, a positive id for a "
            f"document), got {low}"
        )


def check_integer(fn: str | None, name: str, value, *, minimum: int | None = None):
    """`value` must be a Python int or an integer scalar array (traced or not), at
    least `minimum` where concrete."""
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integral and hasattr(value, "dtype"):
        integral = value.shape == () and jnp.issubdtype(value.dtype, jnp.integer)
    if not integral:
        raise TypeError(
            f"{_at(fn)}{name} must be an integer (a Python int or an integer scalar "
            f"array), got {describe(value)}"
        )
    if minimum is not None and is_concrete(value) and int(value) < minimum:
        raise ValueError(f"{_at(fn)}{name} must be >= {minimum}, got {int(value)}")


def check_chunk_size(fn: str | None, name: str, value) -> None:
    """`value` must be a positive Python int or `None`."""
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or value < 1
    ):
        raise ValueError(
            f"{_at(fn)}{name} must be a positive integer or None, got {value!r}"
        )


def check_choice(fn: str | None, name: str, value, choices: tuple[str, ...]) -> None:
    """`value` must be one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{_at(fn)}{name} must be one of {', '.join(map(repr, choices))}, got "
            f"{value!r}"
        )


def check_final_norm(
    fn: str | None, final_norm: Callable, dim: int, dtype
) -> Callable[[jax.Array], jax.Array]:
    """`final_norm` as a function of `[batch, seq, dim]` arrays, or an error naming
    `final_norm`.

    A per-vector norm (one that maps a `[dim]` array to a `[dim]` array, as
    `eqx.nn.RMSNorm(dim)` and `eqx.nn.LayerNorm(dim)` do, following Equinox's
    convention that modules act on one example) comes back `jax.vmap`ped over the
    leading axes; otherwise one that maps a `[batch, seq, dim]` array to one of the
    same shape comes back as it is. A norm over the last axis (such as
    `eqx_mtp.nn.RMSNorm`) gives the same result either way. Decided on abstract
    values (`jax.eval_shape`): nothing runs."""
    if not callable(final_norm):
        raise TypeError(
            f"{_at(fn)}final_norm must be callable, got {type(final_norm).__name__}"
        )
    outcomes = []
    for shape in ((dim,), (2, 3, dim)):
        try:
            out = jax.eval_shape(final_norm, jax.ShapeDtypeStruct(shape, dtype))
        except Exception as error:
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0]}" if lines else repr(error)
            outcomes.append(f"on a {list(shape)} array it failed ({reason})")
            continue
        if getattr(out, "shape", None) == shape:
            return _over_leading_axes(final_norm) if len(shape) == 1 else final_norm
        got = getattr(out, "shape", type(out).__name__)
        outcomes.append(f"on a {list(shape)} array it returned {got}")
    raise ValueError(f"{_at(fn)}{NORM_HINT}; {'; '.join(outcomes)}")


def _over_leading_axes(norm: Callable) -> Callable[[jax.Array], jax.Array]:
    """`norm` of one vector, applied to every vector of an array `[..., dim]`."""

    def apply(x):
        batched = norm
        for _ in range(x.ndim - 1):
            batched = jax.vmap(batched)
        return batched(x)

    return apply


def check_head_inputs(
    fn: str,
    hidden,
    unembedding,
    targets,
    where,
    *,
    layout: str,
    unembedding_name: str = "unembedding",
) -> None:
    """The arguments of a cross-entropy from hidden states: `hidden` `[*layout, dim]`
    float, `unembedding` `[vocab, dim]` float, `targets` `[*layout]` integer ids in
    `[0, vocab)` where counted, `where` (optional) `[*layout]` boolean."""
    shapes = Shapes(fn)
    shapes.check("hidden", hidden, f"{layout} dim")
    check_float(fn, "hidden", hidden)
    shapes.check(unembedding_name, unembedding, "vocab dim")
    check_float(fn, unembedding_name, unembedding)
    shapes.check("targets", targets, layout)
    check_ids(fn, "targets", targets)
    if where is not None:
        shapes.check("where", where, layout)
        check_mask(fn, "where", where)
    check_ids(
        fn,
        "targets",
        targets,
        vocab_size=unembedding.shape[0],
        vocab_of=unembedding_name,
        where=where,
    )


def check_token_arrays(
    shapes: Shapes, *, segment_ids=None, positions=None, loss_mask=None
) -> None:
    """The optional `[batch, seq]` companions of `tokens`: integer `segment_ids`
    (none negative) and `positions`, a boolean `loss_mask`."""
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None:
            shapes.check(name, value, "batch seq")
            check_ids(shapes.fn, name, value)
    if segment_ids is not None:
        check_segment_ids(shapes.fn, "segment_ids", segment_ids)
    if loss_mask is not None:
        shapes.check("loss_mask", loss_mask, "batch seq")
        check_mask(shapes.fn, "loss_mask", loss_mask)
