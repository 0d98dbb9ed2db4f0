"""bench/hlo_stats.py reads a scheduled XLA GPU module as documented: loop trip counts, kernel FLOPs and
bytes, cuDNN attention FLOPs, collectives and the compute that hides them. Hand-made HLO, exact numbers."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("hlo_stats", os.path.join(ROOT, "bench", "hlo_stats.py"))
hs = sys.modules["hlo_stats"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(hs)

STATE = "(s32[], bf16[64,32]{1,0}, bf16[32,16]{1,0}, f32[8,1024]{1,0})"
HLO = f"""HloModule m, is_scheduled=true

%fused_dot (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {{
  %p0 = bf16[64,32]{{1,0}} parameter(0)
  %p1 = bf16[32,16]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[64,16]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%fused_slice (q0: f32[8,1024], q1: s32[]) -> f32[1,1024] {{
  %q1 = s32[] parameter(1)
  %q0 = f32[8,1024]{{1,0}} parameter(0)
  %c0 = s32[] constant(0)
  ROOT %ds = f32[1,1024]{{1,0}} dynamic-slice(%q0, %q1, %c0), dynamic_slice_sizes={{1,1024}}
}}

%add (x: bf16[], y: bf16[]) -> bf16[] {{
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%x, %y)
}}

%cond (c: {STATE}) -> pred[] {{
  %c = {STATE} parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%ci, %four), direction=LT
}}

%body (arg: {STATE}) -> {STATE} {{
  %arg = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %a = bf16[64,32]{{1,0}} get-tuple-element(%arg), index=1
  %w = bf16[32,16]{{1,0}} get-tuple-element(%arg), index=2
  %big = f32[8,1024]{{1,0}} get-tuple-element(%arg), index=3
  %ag-start = ((bf16[32,16]{{1,0}}), bf16[256,16]{{1,0}}) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={{0}}
  %f = bf16[64,16]{{1,0}} fusion(%a, %w), kind=kCustom, calls=%fused_dot
  %s = f32[1,1024]{{1,0}} fusion(%big, %i), kind=kLoop, calls=%fused_slice
  %ag-done = bf16[256,16]{{1,0}} all-gather-done(%ag-start)
  ROOT %t = {STATE} tuple(%i, %a, %w, %big)
}}

ENTRY %main (x: bf16[64,32], w: bf16[32,16], big: f32[8,1024], q: bf16[2,256,4,64]) -> bf16[2,256,4,64] {{
  %x = bf16[64,32]{{1,0}} parameter(0)
  %w0 = bf16[32,16]{{1,0}} parameter(1)
  %big0 = f32[8,1024]{{1,0}} parameter(2)
  %q = bf16[2,256,4,64]{{3,2,1,0}} parameter(3)
  %zero = s32[] constant(0)
  %init = {STATE} tuple(%zero, %x, %w0, %big0)
  %loop = {STATE} while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"4"}}}}
  %rs = bf16[4,16]{{1,0}} reduce-scatter(%w0), channel_id=2, replica_groups=mesh['data'=1,'fsdp'=8] {{'fsdp'}}, dimensions={{0}}, to_apply=%add
  %attn = (bf16[2,256,4,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={{"cudnn_fmha_backend_config": {{"mask_type": "CAUSAL"}}}}
  ROOT %out = bf16[2,256,4,64]{{3,2,1,0}} get-tuple-element(%attn), index=0
}}
"""

DEV = hs.Device(peak_flops=1e12, hbm_bytes_per_s=1e9, link_bytes_per_s=1e9)


def kernels(prog):
    return {k.name: k for k in prog.kernels}


def test_kernels_count_loop_trips_and_read_only_the_slices_they_take():
    prog = hs.analyse(HLO, devices=8)
    k = kernels(prog)
    assert set(k) == {"f", "s", "lt", "attn"}
    assert (k["f"].count, k["s"].count, k["lt"].count, k["attn"].count) == (4, 4, 5, 1)  # condition: trips + 1
    assert k["f"].flops == 2 * 64 * 16 * 32 and k["f"].flops_f32 == 0
    assert k["f"].bytes == 64 * 32 * 2 + 32 * 16 * 2 + 64 * 16 * 2
    assert k["s"].bytes == 1024 * 4 + 4 + 1024 * 4  # one row of the f32[8,1024] operand, the index, the result
    assert k["attn"].flops == 4 * 2 * 4 * 256 * 256 * 64 * 0.5  # causal: half the score matrix
    assert k["attn"].bytes == 4 * 2 * 256 * 4 * 64 * 2  # q, k, v and the output
    assert prog.custom_calls("__cudnn$fmha") == {"__cudnn$fmhaSoftmax": 1}
    assert prog.fusions == (2, 8) and prog.unknown_trip_counts == 0


def test_collectives_are_sized_grouped_and_hidden_by_the_kernels_between_start_and_done():
    prog = hs.analyse(HLO, devices=8)
    ag, rs = prog.collectives
    assert (ag.kind, ag.count, ag.bytes, ag.group, ag.sync) == ("all-gather", 4, 256 * 16 * 2, 8, False)
    assert (rs.kind, rs.count, rs.bytes, rs.group, rs.sync) == ("reduce-scatter", 1, 32 * 16 * 2, 8, True)
    hs.overlap_windows(prog, DEV)
    k = kernels(prog)
    assert ag.window_s == pytest.approx(hs.kernel_time(k["f"], DEV) + hs.kernel_time(k["s"], DEV))
    r = hs.roofline(prog, DEV)
    assert hs.collective_time(ag, DEV) == pytest.approx(8192 * 7 / 8 / 1e9)
    assert r["collective_s"] == pytest.approx(4 * 8192 * 7 / 8 / 1e9 + 1024 * 7 / 8 / 1e9)
    assert r["exposed_collective_s"] == pytest.approx(1024 * 7 / 8 / 1e9)  # the all-gather hides behind f and s
    assert r["compute_s"] == pytest.approx(sum(hs.kernel_time(x, DEV) * x.count for x in prog.kernels))
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["exposed_collective_s"])
    assert set(r["compute_by_category_s"]) == {"matmul", "memory_bound", "attention"}


def test_a_loop_without_a_known_trip_count_is_counted_once_and_reported():
    prog = hs.analyse(HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', ""), devices=8)
    assert kernels(prog)["f"].count == 1 and prog.unknown_trip_counts == 1


def test_f32_dots_run_at_half_the_bf16_peak():
    prog = hs.analyse(HLO.replace("bf16[64,32]", "f32[64,32]").replace("bf16[32,16]", "f32[32,16]"), devices=8)
    f = kernels(prog)["f"]
    assert f.flops == 0 and f.flops_f32 == 2 * 64 * 16 * 32
    fast = hs.Device(peak_flops=1e6, hbm_bytes_per_s=1e12, link_bytes_per_s=1e9)
    assert hs.kernel_time(f, fast) == pytest.approx(f.flops_f32 / 0.5e6)


def test_replica_groups_in_all_three_notations():
    assert hs.replica_groups("replica_groups={{0,2},{1,3}}, x") == [[0, 2], [1, 3]]
    assert hs.replica_groups("replica_groups=[2,4]<=[8], x") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hs.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hs.replica_groups("replica_groups=mesh['data'=2,'fsdp'=4] {'data'}, x") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hs.replica_groups("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, x") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hs.replica_groups("channel_id=1, x") is None


def test_collectives_whose_groups_span_nodes_run_at_the_network_bandwidth():
    prog = hs.analyse(HLO, devices=8)
    ag, rs = prog.collectives
    two_nodes = hs.Device(peak_flops=1e12, hbm_bytes_per_s=1e9, link_bytes_per_s=1e9, network_bytes_per_s=1e8)
    hs.mark_hosts(prog, [0] * 8)  # one node
    assert not ag.crosses_hosts and not rs.crosses_hosts
    hs.mark_hosts(prog, [0, 0, 0, 0, 1, 1, 1, 1])  # both groups of 8 span the two nodes
    assert ag.crosses_hosts and rs.crosses_hosts
    assert hs.collective_time(rs, two_nodes) == pytest.approx(1024 * 7 / 8 / 1e8)
    assert hs.collective_time(ag, hs.Device(1e12, 1e9, 1e9, 1e9)) == pytest.approx(8192 * 7 / 8 / 1e9)
