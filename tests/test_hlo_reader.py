"""The benchmarks' HLO reader (`benchmarks/_hlo.py`) on small hand-written modules,
every expected number worked out by hand from the text."""

import pytest

from benchmarks import _hlo

# Four devices. The entry gathers `a` over all four, runs a loop of 3 iterations
# whose body holds an all-reduce over pairs, a loop of 2 nested in it, and a
# combined (tuple) all-reduce; then a collective-permute, an all-reduce over groups
# of one, and two dots (one inside the outer loop).
MODULE = """\
HloModule jit_step, entry_computation_layout={(f32[4,16]{1,0})->f32[16,32]{1,0}}, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%inner_body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %w.1 = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %ag.in = f32[8,16]{1,0} all-gather(%w.1), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, dimensions={0}
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %t.1 = (s32[], f32[8,16]{1,0}) tuple(%i.1, %ag.in)
}

%inner_cond (c.1: (s32[], f32[8,16])) -> pred[] {
  %c.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %lt.1 = pred[] constant(true)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %w = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,16]{1,0} all-reduce(%w), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %n = s32[2]{0} constant({1, 2})
  %pair = (f32[8,16]{1,0}, s32[2]{0}) all-reduce(%ar, %n), channel_id=2, replica_groups=[2,2]<=[4], to_apply=%add
  %v = f32[16,8]{1,0} constant({...})
  %dot.in = f32[8,8]{1,0} dot(%w, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %inner = (s32[], f32[8,16]{1,0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"2"}}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %ar)
}

%cond (c: (s32[], f32[8,16])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.7 (a: f32[4,16], b: f32[16,32]) -> f32[16,32] {
  %a = f32[4,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  %ag = f32[16,16]{1,0} all-gather(%a), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}, metadata={op_name="jit(step)/gather_weights"}
  %d = f32[16,32]{1,0} dot(%ag, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %zero = s32[] constant(0)
  %init = f32[8,16]{1,0} constant({...})
  %start = (s32[], f32[8,16]{1,0}) tuple(%zero, %init)
  %loop = (s32[], f32[8,16]{1,0}) while(%start), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %cp = bf16[2,4]{1,0} collective-permute-start(%b), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[2,4]{1,0} collective-permute-done(%cp)
  %alone = f32[16,32]{1,0} all-reduce(%d), channel_id=6, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  ROOT %out = f32[16,32]{1,0} copy(%d)
}
"""  # noqa: E501


def _by_name(records):
    return {record["name"]: record for record in records}


def test_collectives_bytes_groups_and_trip_counts():
    records = _by_name(_hlo.collectives(MODULE))
    assert set(records) == {"ag", "ar", "pair", "ag.in", "cp", "alone"}
    # all-gather: the result per device, f32 4×16 = 256 bytes times a group of 4.
    assert records["ag"]["bytes"] == 4 * 16 * 4 * 4 == 1024
    assert (records["ag"]["group"], records["ag"]["times"]) == (4, 1)
    assert records["ag"]["op_name"] == "jit(step)/gather_weights"
    # In the loop of 3: f32 8×16 = 512 bytes over pairs.
    assert (records["ar"]["bytes"], records["ar"]["group"]) == (512, 2)
    assert records["ar"]["times"] == 3
    # A tuple all-reduce counts both arrays; 8 of its bytes are integers.
    assert records["pair"]["bytes"] == 512 + 8
    assert records["pair"]["float_bytes"] == 512
    assert records["pair"]["operands"] == [
        ("f32", (8, 16), 512),
        ("s32", (2,), 8),
    ]
    # Nested loops multiply: 3 × 2; a mesh axis of 2 names the group.
    assert (records["ag.in"]["times"], records["ag.in"]["group"]) == (6, 2)
    assert records["ag.in"]["bytes"] == 512 * 2
    # collective-permute: what one device sends, its operand `b` (f32 16×32);
    # the -done is not a second collective.
    assert records["cp"]["kind"] == "collective-permute"
    assert (records["cp"]["bytes"], records["cp"]["group"]) == (16 * 32 * 4, 2)
    assert records["alone"]["group"] == 1


def test_collective_bytes_totals_and_filter():
    records = _hlo.collectives(MODULE)
    totals = _hlo.collective_bytes(records)
    # ag 1024; ar 3 × 512; pair 3 × 520; ag.in 6 × 1024; cp 2048; alone (group
    # of one) left out.
    assert totals["by_kind"] == {
        "all-gather": 1024 + 6 * 1024,
        "reduce-scatter": 0,
        "all-reduce": 3 * 512 + 3 * 520,
        "collective-permute": 2048,
        "all-to-all": 0,
    }
    assert totals["total"] == 7168 + 3096 + 2048
    assert totals["integer"] == totals["integer_by_kind"]["all-reduce"] == 3 * 8
    only_8x16 = _hlo.collective_bytes(
        records, where=lambda dtype, shape: shape == (8, 16)
    )
    assert only_8x16["total"] == 3 * 512 + 3 * 512 + 6 * 1024


def test_dot_flops_and_instruction_count():
    # Entry: out 16×32, contracted 16 -> 2·512·16; the loop's dot counted once:
    # out 8×8, contracted 16 -> 2·64·16.
    assert _hlo.dot_flops(MODULE) == 2 * 512 * 16 + 2 * 64 * 16
    assert _hlo.instruction_count(MODULE) == 3 + 5 + 2 + 10 + 2 + 12


def test_group_size_forms():
    assert _hlo.group_size("replica_groups={{0,1,2},{3,4,5}}", 6) == 3
    assert _hlo.group_size("replica_groups={}, to_apply=%add", 8) == 8
    assert _hlo.group_size("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == 2
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}"
    assert _hlo.group_size(named, 8) == 4
    assert _hlo.group_size("source_target_pairs={{0,0},{1,1}}", 2) == 1
    with pytest.raises(ValueError, match="no replica groups"):
        _hlo.group_size("channel_id=1", 4)


def test_collective_in_a_loop_of_unknown_trip_count_is_an_error():
    unknown = MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    with pytest.raises(ValueError, match="unknown trip count"):
        _hlo.collectives(unknown)
