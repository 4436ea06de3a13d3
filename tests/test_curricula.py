"""Depth curricula: the schedules, the gradient of a step with depths off, one
compilation per stage, resume mid-stage, and off depths left as they were."""

import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SEGMENT_IDS, TINY_JOB, VOCAB, tiny_config, tree_allclose
from reference import jit_once, loop_mtp_loss_sums, random_model

import eqx_mtp
from eqx_mtp.train import accumulated_loss_and_grad, make_optimizer, train_step
from eqx_mtp.train._job import TrainConfig, UserError, train
from eqx_mtp.train._train_step import _donating_train_step


def _forward_weights(step, switches):
    """Depth k (1-based) is on from `switches[k - 1]` on."""
    return [1.0 if step >= switch else 0.0 for switch in switches]


def _reverse_weights(step, switches):
    """Depth k is off from `switches[D - k]` on: the farthest switches off first."""
    num_depths = len(switches)
    return [
        1.0 if step < switches[num_depths - k] else 0.0
        for k in range(1, 1 + num_depths)
    ]


def _explicit_weights(step, pieces, num_depths):
    """`pieces[k] = [(start, weight), ...]`; a depth not named weighs 1."""
    weights = []
    for k in range(1, num_depths + 1):
        weight = 1.0
        for start, value in pieces.get(k, []):
            if step >= start:
                weight = value
        weights.append(weight)
    return weights


def _last_on(weights):
    on = [k for k, w in enumerate(weights, 1) if w > 0]
    return on[-1] if on else 0


@pytest.mark.parametrize(
    "spec, num_depths, steps, expected",
    [
        ("forward", 2, 300, lambda s: _forward_weights(s, [100, 200])),
        ("forward", 3, 10, lambda s: _forward_weights(s, [2, 5, 7])),
        ("forward@5,9", 2, None, lambda s: _forward_weights(s, [5, 9])),
        ("reverse", 2, 7, lambda s: _reverse_weights(s, [2, 4])),
        (" reverse@3,4,8 ", 3, None, lambda s: _reverse_weights(s, [3, 4, 8])),
        (
            "1:0@0,1@200;2:0@0,1@400",
            2,
            None,
            lambda s: _explicit_weights(
                s, {1: [(0, 0), (200, 1)], 2: [(0, 0), (400, 1)]}, 2
            ),
        ),
        (
            "3:0.5@0,0@6; 1:2",
            3,
            None,
            lambda s: _explicit_weights(s, {1: [(0, 2)], 3: [(0, 0.5), (6, 0)]}, 3),
        ),
        (
            "1:1@0,0@3,1@5",
            2,
            None,
            lambda s: _explicit_weights(s, {1: [(0, 1), (3, 0), (5, 1)]}, 2),
        ),
    ],
)
def test_schedule_weights_equal_a_transcription(spec, num_depths, steps, expected):
    schedule = eqx_mtp.parse_depth_schedule(spec, num_depths=num_depths, steps=steps)
    for step in range(0, 450):
        weights = schedule.depth_weights(step)
        assert weights.dtype == np.float32
        assert weights.tolist() == expected(step), step
        assert schedule.active_depths(step) == _last_on(expected(step)), step


@pytest.mark.parametrize(
    "spec, steps, match",
    [
        ("forward", None, "needs the run's steps"),
        ("forward", 2, "at least 3"),
        ("forward@5", None, "gives 1 step"),
        ("reverse@5,5", None, "must be >= 1 and increase"),
        ("forward@0,5", None, "must be >= 1 and increase"),
        ("forward@a,b", None, "one integer per depth"),
        ("3:1", None, r"depth 3 .* one of 1 … 2"),
        ("1:1;1:0", None, "named once"),
        ("1:-1", None, "finite and >= 0"),
        ("1:1@5", None, "must start at 0"),
        ("sideways", None, "cannot read 'sideways'"),
        ("", None, "expected 'forward'"),
    ],
)
def test_bad_schedules_are_refused_naming_the_argument(spec, steps, match):
    with pytest.raises(ValueError, match="depth_schedule: .*" + match):
        eqx_mtp.parse_depth_schedule(spec, num_depths=2, steps=steps)


def test_the_job_names_the_flag():
    with pytest.raises(UserError, match="--depth-schedule: .*needs MTP depths"):
        TrainConfig.from_dict(dict(depth_schedule="forward", num_depths=0))
    with pytest.raises(UserError, match="--depth-schedule: .*at least 3"):
        TrainConfig.from_dict(dict(depth_schedule="forward", steps=2))


def _batch(seed):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, SEGMENT_IDS.shape)
    return tokens.astype(np.int32)


@pytest.mark.parametrize(
    "mtp_kind, active_depths, depth_weights, mesh_devices",
    [
        ("sequential", 1, [1.0, 0.0], None),  # forward, stage 1: depth 2 off
        ("sequential", 0, None, 2),  # stage 0, over a mesh: no depth runs
        ("parallel", 2, [0.0, 1.0], None),  # depth 1 off, run with weight 0
    ],
)
def test_a_step_with_depths_off_has_the_gradient_of_the_loss_without_them(
    mtp_kind, active_depths, depth_weights, mesh_devices
):
    model = random_model(tiny_config(vocab_size=VOCAB, mtp_kind=mtp_kind))
    tokens = np.stack([_batch(0), _batch(1)])  # 2 micro-batches of 2 rows
    segment_ids = np.stack([SEGMENT_IDS, SEGMENT_IDS[::-1]])
    weight = 0.3
    on = [0.0 if k >= active_depths else 1.0 for k in range(2)]
    on = on if depth_weights is None else depth_weights

    def reference_loss(m):
        sums, counts = loop_mtp_loss_sums(
            m, tokens.reshape(4, 12), segment_ids.reshape(4, 12)
        )
        means = sums / np.asarray(counts, np.float32)
        mtp = sum(w * means[k + 1] for k, w in enumerate(on) if w > 0)
        return means[0] + weight * mtp / max(sum(on), 1.0)

    expected_loss, expected_grads = jit_once(eqx.filter_value_and_grad(reference_loss))(
        model
    )
    mesh = None
    if mesh_devices is not None:
        devices = jax.devices()[:mesh_devices]
        mesh = eqx_mtp.make_mesh(data=mesh_devices, devices=devices)
    batch = dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids))
    loss, aux, grads = jit_once(
        lambda m: accumulated_loss_and_grad(
            m,
            batch,
            mtp_weight=weight,
            depth_weights=depth_weights,
            active_depths=active_depths,
            mesh=mesh,
        )
    )(model)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert tree_allclose(grads, expected_grads, rtol=1e-4, atol=1e-6)
    # Not approximately: exactly zero where nothing reaches.
    off = [
        k
        for k in range(2)
        if k >= active_depths or (mtp_kind == "parallel" and on[k] == 0)
    ]
    trained = [k for k in range(2) if k not in off]
    for leaf in jax.tree.leaves(eqx.filter(grads.depths.depths, eqx.is_array)):
        assert np.all(np.asarray(leaf)[off] == 0)
        assert not trained or np.any(np.asarray(leaf)[trained] != 0)
    assert np.isnan(aux["depth_losses"][active_depths + 1 :]).all()
    assert np.isfinite(aux["depth_losses"][: active_depths + 1]).all()


def test_depths_off_keep_their_parameters_and_optimizer_state():
    """Weight decay on, and momentum from a step with every depth on: a step with
    depth 2 off leaves its parameters and moments exactly as they were; switched on
    again, it moves."""
    # Linear depth layers compile fastest; what is kept does not depend on them.
    model = random_model(tiny_config(vocab_size=VOCAB, mtp_block="linear"))
    optimizer = make_optimizer(
        model, learning_rate=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.5
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    batch = dict(
        tokens=jnp.asarray(_batch(2)[None]), segment_ids=jnp.asarray(SEGMENT_IDS[None])
    )

    def depth_arrays(tree, k):
        depths = [x for x in jax.tree.leaves(tree, is_leaf=_is_model) if _is_model(x)]
        return [
            np.array(leaf[k])
            for d in depths
            for leaf in jax.tree.leaves(eqx.filter(d.depths.depths, eqx.is_array))
        ]

    def step(model, opt_state, active_depths, depth_weights):
        return train_step(
            optimizer,
            model,
            opt_state,
            batch,
            0.3,
            depth_weights=depth_weights,
            active_depths=active_depths,
        )[:2]

    model, opt_state = step(model, opt_state, 2, [1.0, 1.0])
    before = depth_arrays((model, opt_state), 1), depth_arrays((model, opt_state), 0)
    # Moments of depth 2 are non-zero: AdamW would move it if it were not kept.
    assert all(np.any(x != 0) for x in before[0])
    model, opt_state = step(model, opt_state, 1, [1.0, 0.0])
    after = depth_arrays((model, opt_state), 1), depth_arrays((model, opt_state), 0)
    for kept, now in zip(before[0], after[0]):
        np.testing.assert_array_equal(kept, now)
    assert all(np.any(a != b) for a, b in zip(before[1], after[1]))  # depth 1 trains
    model, opt_state = step(model, opt_state, 2, [1.0, 1.0])
    again = depth_arrays(model, 1)
    assert all(np.any(a != b) for a, b in zip(after[0], again))


def _is_model(x):
    return isinstance(x, eqx_mtp.MTPModel)


def _job(corpus, run, **overrides):
    values = dict(
        TINY_JOB,
        steps=6,
        batch_size=4,
        micro_batches=2,
        save_every=3,
        num_devices=1,
        depth_schedule="reverse",
        # Small depth layers: the job compiles one step per stage, several times.
        mtp_block="linear",
        data=corpus,
        run=str(run),
    )
    return TrainConfig.from_dict(values | overrides)


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "eval" not in r}


@pytest.mark.slow
def test_a_curriculum_job_compiles_once_per_stage_and_resumes_bit_for_bit(
    corpus, tmp_path
):
    """A reverse curriculum over 6 steps has 3 stages of 2 steps (depths on: 1 and
    2, 1, none); continued from its checkpoint of step 3, in the middle of the
    second, it gives every later loss and the final parameters of the straight
    run."""
    straight = tmp_path / "straight"
    compiled = _donating_train_step._cached._cache_size()
    summary = train(_job(corpus, straight), progress=False)
    assert _donating_train_step._cached._cache_size() - compiled == 3
    records = _records(straight)
    assert [records[s]["depth_weights"] for s in range(1, 7)] == [
        [1.0, 1.0],
        [1.0, 1.0],
        [1.0, 0.0],
        [1.0, 0.0],
        [0.0, 0.0],
        [0.0, 0.0],
    ]
    assert [
        len([x for x in records[s]["depth_losses"] if x is not None])
        for s in range(1, 7)
    ] == [3, 3, 2, 2, 1, 1]
    # Evaluation runs every depth, on or off: here every depth is off.
    assert len(summary["eval"]["depth_losses"]) == 3
    assert all(loss > 0 for loss in summary["eval"]["depth_losses"])

    # The run as it stood after step 3, in the middle of the second stage.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for checkpoint in (resumed / "checkpoints").iterdir():
        if int(checkpoint.name) > 3:
            shutil.rmtree(checkpoint)
    (resumed / "summary.json").unlink()
    (resumed / "metrics.jsonl").write_text("")
    train(_job(corpus, resumed, resume=True), progress=False)
    again = _records(resumed)
    assert sorted(again) == [4, 5, 6]
    for s in range(4, 7):
        assert again[s]["depth_losses"] == records[s]["depth_losses"], s
        assert again[s]["loss"] == records[s]["loss"], s
    model_a, _ = eqx_mtp.train.load_checkpoint(straight)
    model_b, _ = eqx_mtp.train.load_checkpoint(resumed)
    assert tree_allclose(model_a, model_b, rtol=0, atol=0)
