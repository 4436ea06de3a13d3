"""Reading the text of an optimised HLO module (`compiled.as_text()`): its
instructions, how often each computation runs, its collectives and their bytes, the
FLOPs of its dots. One parser for `mesh.py`, `mfu.py` and `compile_time.py`.

**Counting a collective.** Each collective counts once (an async `-start`, never its
`-done`), times the trip counts of the `while` loops around it
(`backend_config={"known_trip_count":{"n":...}}`; nested loops multiply). Its bytes
per device are the payload, not the wire traffic of an algorithm:

- `all-gather`: its per-device *result* (the operand times the group size);
- `reduce-scatter`, `all-reduce`, `all-to-all`: its operand;
- `collective-permute`: its operand (what one device sends).

A tuple collective (XLA combines several arrays into one) counts every operand.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
    "all-to-all",
)
DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `name = type opcode(operands), attributes`."""

    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str


@dataclasses.dataclass(frozen=True)
class Module:
    """A parsed HLO module: its computations (name to instructions, in order), the
    entry computation's name and the number of devices it runs on."""

    computations: dict[str, list[Instruction]]
    entry: str | None
    num_devices: int

    @property
    def instructions(self) -> dict[str, Instruction]:
        """Every instruction by name (names are unique in a module)."""
        return {i.name: i for body in self.computations.values() for i in body}


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The `(dtype, shape)` of every array in an HLO type (a tuple type has several);
    dtypes without a known size (`token`, …) are left out."""
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY.findall(type_text)
        if dtype in DTYPE_BYTES
    ]


def array_bytes(type_text: str, *, floats_only: bool = False) -> int:
    """Bytes of the arrays in an HLO type; with `floats_only`, of its floating-point
    (and complex) arrays only."""
    return sum(
        DTYPE_BYTES[dtype] * math.prod(shape)
        for dtype, shape in arrays(type_text)
        if not floats_only or dtype[0] in "fbc"
    )


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({"
        depth -= text[i] in ")}"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced HLO: {text[start : start + 80]!r}")


def _instruction(name: str, rest: str) -> Instruction:
    """`type opcode(operands), attributes` of one line, as an `Instruction`."""
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_text, tail = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, tail = rest.partition(" ")
    opcode, _, after = tail.partition("(")
    end = _balanced("(" + after, 0) - 1
    operands = tuple(_NAME.findall(after[: end - 1]))
    return Instruction(name, type_text, opcode, operands, after[end:])


def parse(text: str) -> Module:
    """Parse the text of an HLO module.

    **Arguments:**

    - `text`: `compiled.as_text()` (or any module printed by XLA).

    **Returns:**

    A [`Module`][].
    """
    computations: dict[str, list[Instruction]] = {}
    entry = current = None
    for line in text.splitlines():
        if header := _HEADER.match(line):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif current is not None and (found := _INSTRUCTION.match(line)):
            computations[current].append(_instruction(*found.groups()))
    devices = re.search(r"num_partitions=(\d+)", text)
    return Module(computations, entry, int(devices.group(1)) if devices else 1)


def runs(module: Module) -> dict[str, int | None]:
    """How many times each computation runs per execution of the entry: the sum over
    its callers of the caller's runs times the trip count of the calling `while`
    (1 for any other call). `None` where a loop around it has no known trip count
    (the trip count depends on data)."""
    callers = collections.defaultdict(list)
    for caller, body in module.computations.items():
        for instruction in body:
            attributes = instruction.attributes
            trips = 1
            if instruction.opcode == "while":
                found = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                trips = None if found is None else int(found.group(1))
            callees = []
            if branches := re.search(r"branch_computations=\{([^}]*)\}", attributes):
                callees += _NAME.findall(branches.group(1))
            for key in ("true_computation", "false_computation"):
                if found := re.search(rf"{key}=%([\w.\-]+)", attributes):
                    callees.append(found.group(1))
            for callee in _CALLEE.findall(attributes):
                callers[callee].append((caller, trips))
            for callee in callees:
                callers[callee].append((caller, 1))
    counts: dict[str, int | None] = {}

    def count(computation):
        if computation == module.entry:
            return 1
        if computation not in counts:
            counts[computation] = 0  # a cycle would be a malformed module
            total = 0
            for caller, trips in callers[computation]:
                outer = count(caller)
                if trips is None or outer is None:
                    total = None
                    break
                total += outer * trips
            counts[computation] = total
        return counts[computation]

    return {name: count(name) for name in module.computations}


def group_size(attributes: str, num_devices: int) -> int:
    """Devices per replica group of a collective, in any of the forms XLA prints
    (explicit groups, iota groups `[n,g]<=[...]`, named mesh axes, or the pairs of a
    collective-permute: 2 if any device sends to another, else 1)."""
    if match := re.search(r"replica_groups=\{(\{[^}]*\})", attributes):
        return len(match.group(1).strip("{}").split(","))
    if re.search(r"replica_groups=\{\}", attributes):
        return num_devices
    if match := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes):
        return int(match.group(1))
    if match := re.search(
        r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes
    ):
        axes = {name: int(n) for name, n in re.findall(r"'(\w+)'=(\d+)", match[1])}
        return math.prod(axes[name] for name in re.findall(r"'(\w+)'", match[2]))
    if match := re.search(r"source_target_pairs=\{(.*?)\}\}", attributes):
        pairs = re.findall(r"\{(\d+),(\d+)", match.group(1) + "}")
        return 2 if any(a != b for a, b in pairs) else 1
    raise ValueError(f"no replica groups in {attributes[:200]!r}")


def collectives(text: str) -> list[dict]:
    """Every collective of an optimised HLO module.

    **Arguments:**

    - `text`: the module's text.

    **Returns:**

    One `dict` per collective instruction: `kind` (of `KINDS`), `name`, `bytes`
    and `float_bytes` per device per run (this module's conventions), `operands`
    (`(dtype, shape, bytes)` of each array it moves, bytes counted the same way),
    `group` (devices per replica group), `times` (runs per execution), `type` and
    `op_name` (JAX's metadata). Raises `ValueError` for a collective in a loop of
    unknown trip count.
    """
    module = parse(text)
    instructions = module.instructions
    counts = runs(module)
    records = []
    for computation, body in module.computations.items():
        for instruction in body:
            kind = instruction.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            if counts[computation] is None:
                raise ValueError(
                    f"collective {instruction.name} runs in a loop of unknown trip "
                    "count"
                )
            group = group_size(instruction.attributes, module.num_devices)
            names = instruction.operands
            if kind == "collective-permute":
                names = names[:1]
            scale = group if kind == "all-gather" else 1
            operands = [
                (dtype, shape, scale * DTYPE_BYTES[dtype] * math.prod(shape))
                for name in names
                if name in instructions
                for dtype, shape in arrays(instructions[name].type)
            ]
            op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
            records.append(
                dict(
                    kind=kind,
                    name=instruction.name,
                    bytes=sum(o[2] for o in operands),
                    float_bytes=sum(o[2] for o in operands if o[0][0] in "fbc"),
                    operands=operands,
                    group=group,
                    times=counts[computation],
                    type=instruction.type,
                    op_name=op_name.group(1) if op_name else "",
                )
            )
    return records


def collective_bytes(records: list[dict], where=None) -> dict:
    """Bytes per device per execution of [`collectives`][]'s records whose groups
    hold two devices or more (a group of one moves nothing).

    **Arguments:**

    - `records`: [`collectives`][]'s result.
    - `where`: optional `(dtype, shape) -> bool`: count only the operands it
        accepts (e.g. the arrays of one parameter).

    **Returns:**

    `by_kind` (every kind of `KINDS`), their `total`, and the part that is not
    floating point, `integer_by_kind` and `integer` (token ids, flags).
    """
    by_kind = dict.fromkeys(KINDS, 0)
    integer_by_kind = dict.fromkeys(KINDS, 0)
    for record in records:
        if record["group"] < 2:
            continue
        for dtype, shape, nbytes in record["operands"]:
            if where is not None and not where(dtype, shape):
                continue
            by_kind[record["kind"]] += nbytes * record["times"]
            if dtype[0] not in "fbc":
                integer_by_kind[record["kind"]] += nbytes * record["times"]
    return dict(
        by_kind=by_kind,
        total=sum(by_kind.values()),
        integer_by_kind=integer_by_kind,
        integer=sum(integer_by_kind.values()),
    )


def instruction_count(text: str) -> int:
    """Instructions of every computation of the module (fused ones included)."""
    return sum(len(body) for body in parse(text).computations.values())


def dot_flops(text: str) -> int:
    """FLOPs of the module's `dot` instructions, `2 ·` output size `·` contracted size
    each, every instruction counted once whatever loop it is in (so the work of a
    module whose loops are unrolled).

    **Arguments:**

    - `text`: the module's text.

    **Returns:**

    The FLOPs, an `int`.
    """
    module = parse(text)
    instructions = module.instructions
    total = 0
    for body in module.computations.values():
        for instruction in body:
            if instruction.opcode != "dot":
                continue
            contracting = re.search(
                r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attributes
            )
            (_, lhs), (_, out) = (
                arrays(instructions[instruction.operands[0]].type)[0],
                arrays(instruction.type)[0],
            )
            dims = [int(d) for d in contracting.group(1).split(",") if d]
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in dims)
    return total
