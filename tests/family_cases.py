"""The family cases of `test_families.py`: for each family, the options that make it
itself and the plausible loader bugs they catch, as mutations the NumPy reference
can run (so a test can show that each bug moves the logits)."""

import numpy as np
from hf_reference import family_config, random_family_tensors

TOKENS = np.array([3, 17, 0, 22, 5, 5, 9, 1, 14, 2, 8, 20, 31, 40, 7, 11], np.int32)
RTOL = ATOL = 1e-5
LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=256,
)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)

# family -> (config options, {plausible bug: how it would change what is computed}).
# A bug is a config or tensor mutation the reference runs; see `_mutated`.
CASES = {
    # head_dim 8 at θ=500: wavelengths 6, 30, 140, 664 against the band [64, 256]
    # of original_max_position 256: two frequencies kept, one smoothed, one divided.
    "llama": (
        dict(rope_theta=500.0, rope_scaling=LLAMA3, max_position_embeddings=1024),
        {
            "θ read from the wrong key (10000 kept)": dict(rope_theta=10_000.0),
            "rope_scaling ignored": dict(rope_scaling=None),
            "llama3 smoothing band inverted": dict(
                rope_scaling=LLAMA3 | dict(low_freq_factor=4.0, high_freq_factor=1.0)
            ),
        },
    ),
    # Mistral-7B-v0.3's θ; a window of 5 on rows of 16.
    "mistral": (
        dict(rope_theta=1_000_000.0, sliding_window=5),
        {
            "θ read from the wrong key (10000 kept)": dict(rope_theta=10_000.0),
            "window ignored": dict(sliding_window=None),
            "window off by one (sees W + 1 keys)": dict(sliding_window=6),
        },
    ),
    # Window on layers >= max_window_layers = 1 only (Qwen2's rule).
    "qwen2": (
        dict(
            rope_theta=5_000.0,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        {
            "q/k/v bias dropped": "zero_biases",
            "window on every layer (max_window_layers ignored)": dict(
                max_window_layers=0
            ),
            "window off by one (sees W - 1 keys)": dict(sliding_window=3),
        },
    ),
    # Explicit head_dim 12 (dim / heads = 8), per-head q/k norms, YaRN.
    "qwen3": (
        dict(rope_theta=2_000.0, rope_scaling=YARN, max_position_embeddings=128),
        {
            "q/k norm dropped": "unit_qk_norms",
            "YaRN attention factor dropped": dict(
                rope_scaling=YARN | dict(attention_factor=1.0)
            ),
            "YaRN ramp without truncation": dict(
                rope_scaling=YARN | dict(truncate=False)
            ),
        },
    ),
    "phi3": (
        dict(rope_theta=300.0, sliding_window=6),
        {
            "fused gate/up halves swapped": "swap_gate_up",
            "fused q/k/v split at the wrong rows": "rotate_qkv",
            "window ignored": dict(sliding_window=None),
        },
    ),
    # q/k norms over the whole projections (not per head), post-norms, and a linear
    # RoPE scaling (any family may carry one; transformers 4's OLMo-2 reads only the
    # legacy `type` key, which the v4 layouts then carry).
    "olmo2": (
        dict(
            rope_theta=500.0,
            rope_scaling=dict(rope_type="linear", factor=4.0),
            legacy_type_key=True,
        ),
        {
            "post-norms dropped": "unit_post_norms",
            "q/k norm dropped": "unit_qk_norms",
            "linear factor ignored": dict(rope_scaling=None),
        },
    ),
    # Layer 1 is NoPE (no_rope_layers = [1, 0]; 1 = uses RoPE); tied embeddings.
    "smollm3": (
        dict(rope_theta=5_000.0),
        {
            "no_rope_layers ignored": dict(no_rope_layers=[1, 1]),
            "no_rope_layers read inverted (1 = NoPE)": dict(no_rope_layers=[0, 1]),
        },
    ),
    "mimo": (
        dict(rope_theta=20_000.0),
        {"q/k/v bias dropped": "zero_biases"},
    ),
}


def mutated(config, tensors, bug):
    """`(tensors, config)` as a loader with `bug` would compute them."""
    if isinstance(bug, dict):
        changed = dict(config)
        for key, value in bug.items():
            if "rope_parameters" not in changed or key not in (
                "rope_theta",
                "rope_scaling",
            ):
                changed[key] = value
            elif key == "rope_theta":
                changed["rope_parameters"] = changed["rope_parameters"] | {key: value}
            else:
                theta = changed["rope_parameters"]["rope_theta"]
                changed["rope_parameters"] = dict(
                    value or {"rope_type": "default"}, rope_theta=theta
                )
            if key == "max_window_layers" and "layer_types" in changed:
                del changed["layer_types"]
        return tensors, changed
    changed = dict(tensors)
    for name, value in tensors.items():
        if bug == "zero_biases" and name.endswith(".bias"):
            changed[name] = np.zeros_like(value)
        if bug == "unit_qk_norms" and ("q_norm" in name or "k_norm" in name):
            changed[name] = np.ones_like(value)
        if bug == "unit_post_norms" and "post_" in name:
            changed[name] = np.ones_like(value)
        if bug == "swap_gate_up" and name.endswith("gate_up_proj.weight"):
            changed[name] = np.concatenate(np.split(value, 2)[::-1])
        if bug == "rotate_qkv" and name.endswith("qkv_proj.weight"):
            changed[name] = np.roll(value, config["hidden_size"] // 2, axis=0)
    return changed, config


def config_and_tensors(family, layout, *, depths=None, depth_layout=None, **more):
    """A case's config (with `more` options) and random tensors; `depths` defaults to
    what the config announces, in the family's own layout."""
    options, _ = CASES[family]
    config = family_config(family, layout=layout, **(options | more))
    if depths is None:
        depths = config.get("num_nextn_predict_layers", 0)
    if depth_layout is None:
        depth_layout = "mimo" if family == "mimo" else "deepseek_v3"
    tensors = random_family_tensors(
        config, seed=7, depths=depths, depth_layout=depth_layout
    )
    return config, tensors
