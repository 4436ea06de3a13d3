"""The tables of `mesh.py`: the formula against the HLO per mesh, a summary, the
tied embedding's share, and the formula at pod scale."""

from __future__ import annotations

import sys

import _common
import _hlo
import _mesh_formula as formula

MiB = 2**20


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.3f}" if denominator else "—"


def _mib(nbytes) -> str:
    return f"{nbytes / MiB:.2f}"


def mesh_name(record) -> str:
    return "({data}, {model}, {context})".format(**record["mesh"])


def mesh_tables(record) -> str:
    """Formula against HLO by collective kind, then the formula's terms."""
    hlo, by_kind = record["hlo"], record["formula"]["by_kind"]
    rows = [
        [
            kind,
            f"{hlo['by_kind'][kind]:,}",
            f"{hlo['integer_by_kind'][kind]:,}",
            f"{by_kind[kind]:,}",
            _ratio(by_kind[kind], hlo["by_kind"][kind]),
        ]
        for kind in _hlo.KINDS
        if hlo["by_kind"][kind] or by_kind[kind]
    ]
    total = record["formula"]["total"]
    rows.append(
        ["**total**", f"{hlo['total']:,}", f"{hlo['integer']:,}", f"{total:,}"]
        + [_ratio(total, hlo["total"])]
    )
    terms = [
        [t["name"], t["group"], t["axis"], t["kind"], f"{t['bytes']:,}"]
        for t in record["formula"]["terms"]
    ]
    header = ["collective", "HLO bytes", "of which integer", "formula bytes"]
    return "\n".join(
        [
            f"**Mesh (data, model, context) = {mesh_name(record)}**: bytes per device "
            "per step",
            "",
            _common.markdown_table([*header, "formula / HLO"], rows),
            "",
            _common.markdown_table(
                ["formula term", "group", "axis", "kind", "bytes"], terms
            ),
        ]
    )


def summary_table(records) -> str:
    """One row per mesh: collective totals, parameter and optimizer state per device
    against one device, XLA's memory analysis."""

    def state_bytes(record):
        return record["param_bytes_per_device"] + record["opt_state_bytes_per_device"]

    baseline = next(r for r in records if set(r["mesh"].values()) == {1})
    rows = []
    for record in records:
        memory = record["memory"]
        hlo, total = record["hlo"]["total"], record["formula"]["total"]
        rows.append(
            [
                mesh_name(record),
                _mib(hlo),
                _mib(total),
                _ratio(total, hlo),
                _mib(state_bytes(record)),
                f"{state_bytes(record) / state_bytes(baseline):.3f}",
                _mib(memory["argument_bytes"]),
                _mib(memory["output_bytes"]),
                _mib(memory["temp_bytes"]),
                f"{record['seconds']['compile']:.1f}",
            ]
        )
    return _common.markdown_table(
        ["mesh (d, m, c)", "HLO MiB", "formula MiB", "formula / HLO"]
        + ["param + opt MiB/device", "ratio to 1 device", "argument MiB"]
        + ["output MiB", "temp MiB", "compile s"],
        rows,
    )


def embedding_table(records) -> str:
    """One row per mesh: the tied embedding's collective bytes, HLO and formula, and
    their share of all the step's collective bytes."""
    rows = []
    for record in records[1:]:
        hlo, embedding = record["hlo"]["total"], record["hlo_embedding"]["total"]
        by_group = record["formula"]["by_group"]
        rows.append(
            [
                mesh_name(record),
                _mib(embedding),
                _mib(by_group.get("embedding", 0)),
                _ratio(by_group.get("embedding", 0), embedding),
                f"{100 * embedding / hlo:.1f}%" if hlo else "—",
                _mib(by_group.get("blocks", 0)),
                _mib(by_group.get("activations", 0)),
            ]
        )
    return _common.markdown_table(
        ["mesh (d, m, c)", "embedding HLO MiB", "embedding formula MiB"]
        + ["formula / HLO", "embedding share of HLO"]
        + ["blocks formula MiB", "activations formula MiB"],
        rows,
    )


def pod_report(costs: list[dict], rows: int = 1024, seq: int = 4096) -> str:
    """`_mesh_formula.pod_costs`'s results as Markdown tables, GiB per device per
    step."""
    GiB = 2**30
    axes = formula.POD_AXES
    header = ["mesh (d, m, c)", "attention", *axes, "total", "params GiB/device"]
    titles = dict(
        zip(
            (name for name, _, _ in formula.POD_MODELS),
            (
                "**Llama-2-7B trunk (32 layers, 32 heads, 32 kv heads, mlp 11008, "
                "vocab 32000, tied) + D = 1 transformer depth**",
                "Of which its depth adds (D = 1 minus D = 0):",
                "**One DeepSeek-V3-sized MTP depth** (dim 7168, vocab 129280; its "
                "block as a dense transformer block: 128 heads of 128, SwiGLU 18432 "
                "in place of the MoE layer; D = 1 minus D = 0 on no trunk layers)",
            ),
        )
    )
    lines = [
        f"## The formula at pod scale: {rows} rows × {seq} tokens per step, bf16, "
        "gradients reduce-scattered",
        "",
        "GiB per device per step, by the mesh axis each collective runs over.",
        "",
    ]
    for name, title in titles.items():
        table = [
            [
                "({data}, {model}, {context})".format(**cost["mesh"]),
                cost["context_attention"],
                *(f"{cost['bytes_by_axis'][axis] / GiB:.2f}" for axis in axes),
                f"{cost['total_bytes'] / GiB:.2f}",
                f"{cost['param_bytes_per_device'] / GiB:.3f}",
            ]
            for cost in costs
            if cost["model"] == name
        ]
        lines += [title, "", _common.markdown_table(header, table), ""]
    lines.append(
        "`kv_gather`: what the library does (keys, values and key segment ids "
        'gathered over `context`, again in the backward under `remat="full"`; '
        "what the benchmark measures); `xla`: attention left unconstrained to "
        "XLA's partitioner, which splits the logits by key (the library before it "
        "gathered keys and values)."
    )
    return "\n".join(lines)


def print_report(args, config, records, seconds) -> None:
    print(
        f"\n`python benchmarks/mesh.py{' ' if sys.argv[1:] else ''}"
        f"{' '.join(sys.argv[1:])}`: vocab {args.vocab}, dim {args.dim}, "
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, mlp "
        f"{args.mlp_dim}, D = {args.depths}, {args.micro_batches} micro-batch(es) of "
        f"{args.batch} × {args.seq} tokens, float32, loss_impl {config.loss_impl}, "
        f"remat {config.remat}; {len(records)} compilations in {seconds:.0f} s.\n"
    )
    for record in records[1:]:
        print(mesh_tables(record) + "\n")
    print(summary_table(records) + "\n")
    print("The tied embedding's collectives (its gather, the one reduction of its")
    print("copies' gradient for every lookup and head), bytes per device per step:\n")
    print(embedding_table(records) + "\n")
    mismatched = [
        mesh_name(r)
        for r in records
        if r["param_bytes_per_device"] != r["formula_param_bytes_per_device"]
    ]
    print(
        "Parameter bytes per device of `parameter_bytes_per_device` against the "
        "placed arrays' `addressable_shards[0]`: "
        + (
            f"differ on {', '.join(mismatched)}."
            if mismatched
            else "equal on every mesh."
        )
    )
