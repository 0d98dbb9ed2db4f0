"""What a compiled XLA GPU program does per step, read from its optimised HLO text
(`compiled.as_text()`): kernels, their FLOPs and HBM bytes, collectives, cuDNN attention calls, and a
roofline time. Used by bench/gpu_aot.py; pure Python, so it is tested on any machine.

The model (documented in docs/gpu_aot.md):
  * Executed computations are walked from ENTRY; a while loop's body runs `known_trip_count` times
    (XLA records it), every branch of a conditional is counted once (an upper bound).
  * A kernel is a top-level fusion, custom call, copy or other non-structural instruction. Its bytes
    are its operands and results, except an operand the fusion only slices (the slice is counted)
    and an in-place dynamic-update-slice result (the update is counted). FLOPs are 2 x the dots'
    multiply-adds inside it; cuDNN flash attention (invisible to XLA) is 4·B·N·T·S·H forward, halved
    when causal, and 2.5x that backward.
  * Roofline time of a kernel = max(FLOPs / peak, bytes / HBM bandwidth), f32 dots at half the bf16
    peak (TF32); kernels run one after another.
  * A collective over n devices moves (n-1)/n of its full buffer per device (twice for all-reduce)
    at the link bandwidth, or the network's when its groups span nodes. An async one is hidden by the kernels scheduled between its start and
    done; the rest, and every synchronous one, is exposed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .*\{$")
INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
STRUCTURAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
              "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota",
              "async-start", "async-update", "async-done", "copy-start", "copy-done", "send", "send-done",
              "recv", "recv-done"}
CUDNN_ATTENTION = "__cudnn$fmha"


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    args: str  # the text between the opcode's parentheses
    attrs: str


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    by_name: dict[str, Instr]


def _balanced(s: str, i: int) -> int:
    """Index just past the parenthesis group that opens at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced parentheses in HLO: {s[:200]}")


def parse_instr(line: str) -> Instr | None:
    m = INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    type_, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"[\w\-$]+", rest)
    if not op:
        return None
    close = _balanced(rest, op.end())
    args = rest[op.end() + 1:close - 1]
    return Instr(m.group(1), type_, op.group(0), re.findall(r"%([\w.\-]+)", args), args, rest[close:])


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """{name: Computation} and the ENTRY computation's name."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        h = HEADER.match(line)
        if h:
            cur = Computation(h.group(2), [], {})
            comps[cur.name] = cur
            entry = cur.name if h.group(1) else entry
        elif line.strip() == "}":
            cur = None
        elif cur is not None and (ins := parse_instr(line)):
            cur.instrs.append(ins)
            cur.by_name[ins.name] = ins
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def shapes(type_: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in SHAPE.findall(type_)]


def nbytes(type_: str) -> float:
    total = 0.0
    for d, dims in shapes(type_):
        n = 1
        for x in dims:
            n *= x
        total += n * DTYPE_BYTES[d]
    return total


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([%\w.\-, ]+)\}?", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _backend_config(attrs: str) -> dict:
    i = attrs.find("backend_config=")
    if i < 0:
        return {}
    s = attrs[i + len("backend_config="):]
    try:
        return json.JSONDecoder().raw_decode(s)[0]
    except ValueError:
        return {}


def _tuple_parts(type_: str) -> list[str]:
    """Top-level elements of a tuple type '(a, (b, c), d)'."""
    inner, parts, depth, start = type_[1:-1], [], 0, 0
    for i, ch in enumerate(inner):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)  # layouts hold commas too
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return [p for p in parts if p]


# ----- FLOPs and bytes of one kernel ------------------------------------------------------------------

def _dot_flops(ins: Instr, comp: Computation) -> tuple[float, bool]:
    """(FLOPs, whether an operand is f32) of a dot instruction."""
    out = shapes(ins.type)[0][1]
    lhs = shapes(comp.by_name[ins.operands[0]].type)[0]
    contracting = [int(x) for x in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs).group(1).split(",") if x]
    k = 1
    for c in contracting:
        k *= lhs[1][c]
    n = 1
    for x in out:
        n *= x
    f32 = any(shapes(comp.by_name[o].type)[0][0] == "f32" for o in ins.operands[:2])
    return 2.0 * n * k, f32


def _fusion_flops(comps: dict, name: str) -> tuple[float, float]:
    """(bf16-rate FLOPs, f32-rate FLOPs) of the dots inside a fused computation (nested ones too)."""
    fast = slow = 0.0
    comp = comps[name]
    for ins in comp.instrs:
        if ins.opcode == "dot":
            f, is_f32 = _dot_flops(ins, comp)
            slow, fast = (slow + f, fast) if is_f32 else (slow, fast + f)
        for sub in _called(ins.attrs, "calls"):
            a, b = _fusion_flops(comps, sub)
            fast, slow = fast + a, slow + b
    return fast, slow


def _fusion_bytes(comps: dict, ins: Instr, comp: Computation) -> float:
    fused = comps[_called(ins.attrs, "calls")[0]]
    users = collections.defaultdict(list)
    for u in fused.instrs:
        for o in u.operands:
            users[o].append(u)
    total = 0.0
    param_list = sorted((p for p in fused.instrs if p.opcode == "parameter"), key=_param_index)
    for idx, opname in enumerate(ins.operands):
        full = nbytes(comp.by_name[opname].type) if opname in comp.by_name else 0.0
        p = param_list[idx] if idx < len(param_list) else None
        us = users.get(p.name, []) if p is not None else []
        if us and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == p.name for u in us):
            total += min(full, sum(nbytes(u.type) for u in us))
        elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == p.name for u in us):
            continue  # updated in place: only the update is written (counted with the result)
        else:
            total += full
    root = fused.instrs[-1] if fused.instrs else None
    if root is not None and root.opcode == "dynamic-update-slice":
        total += nbytes(fused.by_name[root.operands[1]].type) if root.operands[1] in fused.by_name else 0.0
    else:
        total += nbytes(ins.type)
    return total


def _param_index(p: Instr) -> int:
    return int(p.args)


def _attention_flops(ins: Instr, comp: Computation) -> float:
    q = shapes(comp.by_name[ins.operands[0]].type)[0][1]
    k = shapes(comp.by_name[ins.operands[1]].type)[0][1]
    b, t, n, h = q
    s = k[1]
    cfg = _backend_config(ins.attrs).get("cudnn_fmha_backend_config", {})
    flops = 4.0 * b * n * t * s * h * (0.5 if "CAUSAL" in cfg.get("mask_type", "") else 1.0)
    return flops * (2.5 if "Backward" in ins.attrs.split("custom_call_target=")[1][:40] else 1.0)


def _gemm_flops(ins: Instr, comp: Computation) -> float:
    dims = _backend_config(ins.attrs).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
    lhs = shapes(comp.by_name[ins.operands[0]].type)[0][1]
    k = 1
    for c in dims.get("lhs_contracting_dimensions", []):
        k *= lhs[int(c)]
    out = shapes(ins.type)[0][1]
    n = 1
    for x in out:
        n *= x
    return 2.0 * n * k


# ----- the walk ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    name: str
    opcode: str
    count: float  # executions per program run
    flops: float  # per execution, bf16 rate
    flops_f32: float  # per execution, f32 (TF32) rate
    bytes: float  # per execution
    target: str = ""  # custom-call target


@dataclasses.dataclass
class Collective:
    kind: str
    count: float
    bytes: float  # full buffer per device per execution
    group: int
    sync: bool
    where: tuple[str, str]  # (computation, instruction)
    groups: list[list[int]] | None  # its replica groups (logical device ids), when XLA prints them
    window_s: float = 0.0  # roofline time of the kernels scheduled between start and done
    crosses_hosts: bool = False  # set by the caller (mark_hosts): its groups span nodes


@dataclasses.dataclass
class Program:
    kernels: list[Kernel]
    collectives: list[Collective]
    unknown_trip_counts: int  # while loops without a known trip count (counted once)
    comps: dict[str, Computation]

    def custom_calls(self, prefix: str) -> collections.Counter:
        c = collections.Counter()
        for k in self.kernels:
            if k.target.startswith(prefix):
                c[k.target] += k.count
        return c

    @property
    def fusions(self) -> tuple[int, float]:
        """(fusion instructions in the program, fusion launches per run)."""
        fs = [k for k in self.kernels if k.opcode == "fusion"]
        return len(fs), sum(k.count for k in fs)


def replica_groups(attrs: str) -> list[list[int]] | None:
    """The device groups (logical ids) of a collective, from any of XLA's three notations:
    {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm), and mesh['a'=2,'b'=4] {'b'} (groups along the named axes)."""
    import numpy as np

    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = [(a, int(n)) for a, n in re.findall(r"'?(\w+)'?=(\d+)", m.group(1))]
        along = set(re.findall(r"'(\w+)'", m.group(2)))
        ids = np.arange(int(np.prod([n for _, n in sizes]))).reshape([n for _, n in sizes])
        inner = [i for i, (a, _) in enumerate(sizes) if a in along]
        outer = [i for i in range(len(sizes)) if i not in inner]
        return np.transpose(ids, outer + inner).reshape(-1, int(np.prod([sizes[i][1] for i in inner] or [1]))).tolist()
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = np.transpose(ids, [int(x) for x in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attrs)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return None


def _group_size(attrs: str, default: int) -> int:
    groups = replica_groups(attrs)
    return len(groups[0]) if groups else default


def _collective_bytes(ins: Instr, comp: Computation) -> float:
    if ins.opcode.endswith("-start") and ins.type.startswith("(("):
        parts = _tuple_parts(ins.type)
        return max(nbytes(parts[0]), sum(nbytes(p) for p in parts[1:]))
    ins_bytes = sum(nbytes(comp.by_name[o].type) for o in ins.operands if o in comp.by_name)
    return max(ins_bytes, nbytes(ins.type))


def analyse(text: str, devices: int) -> Program:
    comps, entry = parse(text)
    kernels, collectives, unknown = [], [], 0
    seen_mult: dict[str, float] = collections.defaultdict(float)

    def walk(name: str, mult: float):
        nonlocal unknown
        comp = comps[name]
        seen_mult[name] += mult
        for ins in comp.instrs:
            op = ins.opcode
            if op == "while":
                trip = _backend_config(ins.attrs).get("known_trip_count", {}).get("n")
                unknown += trip is None
                n = int(trip) if trip is not None else 1
                for c in _called(ins.attrs, "condition"):
                    walk(c, mult * (n + 1))
                for c in _called(ins.attrs, "body"):
                    walk(c, mult * n)
                continue
            if op == "conditional":
                for key in ("true_computation", "false_computation", "branch_computations"):
                    for c in _called(ins.attrs, key):
                        walk(c, mult)
                continue
            if op in ("call", "async-start"):
                for c in _called(ins.attrs, "to_apply") + _called(ins.attrs, "calls"):
                    walk(c, mult)
                continue
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                collectives.append(Collective(base, mult, _collective_bytes(ins, comp), _group_size(ins.attrs, devices),
                                              not op.endswith("-start"), (comp.name, ins.name), replica_groups(ins.attrs)))
                continue
            if op in STRUCTURAL or op.endswith("-done"):
                continue
            target = ""
            flops = flops32 = 0.0
            if op == "fusion":
                flops, flops32 = _fusion_flops(comps, _called(ins.attrs, "calls")[0])
                b = _fusion_bytes(comps, ins, comp)
            else:
                b = nbytes(ins.type) + sum(nbytes(comp.by_name[o].type) for o in ins.operands if o in comp.by_name)
                if op == "custom-call":
                    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs).group(1)
                    if target.startswith(CUDNN_ATTENTION):
                        flops = _attention_flops(ins, comp)
                    elif "gemm" in target or "matmul" in target:
                        flops = _gemm_flops(ins, comp)
                elif op == "dot":
                    f, is_f32 = _dot_flops(ins, comp)
                    flops, flops32 = (0.0, f) if is_f32 else (f, 0.0)
            kernels.append(Kernel(ins.name, op, mult, flops, flops32, b, target))

    walk(entry, 1.0)
    return Program(kernels, collectives, unknown, comps)


# ----- roofline ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Device:
    peak_flops: float  # bf16 dense FLOP/s
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # collective bus bandwidth per device within a node, one direction
    network_bytes_per_s: float = 0.0  # the same across nodes (collectives whose groups span hosts)


def kernel_time(k: Kernel, dev: Device) -> float:
    return max(k.flops / dev.peak_flops + k.flops_f32 / (dev.peak_flops / 2), k.bytes / dev.hbm_bytes_per_s)


def collective_time(c: Collective, dev: Device) -> float:
    n = max(c.group, 1)
    if n == 1:
        return 0.0
    factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(c.kind, (n - 1) / n)
    return c.bytes * factor / (dev.network_bytes_per_s if c.crosses_hosts else dev.link_bytes_per_s)


def exposed_time(c: Collective, dev: Device) -> float:
    """A synchronous collective's whole time; an asynchronous one's beyond its overlap window."""
    t = collective_time(c, dev)
    return t if c.sync else max(0.0, t - c.window_s)


def mark_hosts(prog: Program, host_of: list[int]) -> None:
    """Sets crosses_hosts on collectives with a group spanning hosts; host_of[i]: the host of logical
    device i (the program's device assignment). Groups XLA does not print are taken to span all."""
    for c in prog.collectives:
        groups = c.groups or [list(range(len(host_of)))]
        c.crosses_hosts = any(len({host_of[i] for i in g}) > 1 for g in groups)


_NESTED = ("body", "true_computation", "false_computation", "branch_computations", "to_apply", "calls")


def overlap_windows(prog: Program, dev: Device) -> None:
    """Sets each async collective's window: the roofline time of what runs between its start and
    done in the schedule (a scheduled module's text order), nested loops at their full time."""
    comps = prog.comps
    own = {k.name: kernel_time(k, dev) for k in prog.kernels}
    memo: dict[str, float] = {}

    def instr_time(ins: Instr) -> float:
        if ins.opcode not in STRUCTURAL:
            return own.get(ins.name, 0.0)
        trips = int(_backend_config(ins.attrs).get("known_trip_count", {}).get("n", 1)) if ins.opcode == "while" else 1
        return trips * sum(comp_time(c) for key in _NESTED for c in _called(ins.attrs, key))

    def comp_time(name: str) -> float:
        if name not in memo:
            memo[name] = sum(instr_time(i) for i in comps[name].instrs)
        return memo[name]

    windows = {}
    for comp in comps.values():
        starts = {}
        for i, ins in enumerate(comp.instrs):
            if ins.opcode.endswith("-start") and ins.opcode[:-len("-start")] in COLLECTIVES:
                starts[ins.name] = i
            elif ins.opcode.endswith("-done") and ins.operands and ins.operands[0] in starts:
                i0 = starts.pop(ins.operands[0])
                windows[(comp.name, ins.operands[0])] = sum(instr_time(m) for m in comp.instrs[i0 + 1:i])
    for c in prog.collectives:
        c.window_s = windows.get(c.where, 0.0)


def category(k: Kernel) -> str:
    if k.target.startswith(CUDNN_ATTENTION):
        return "attention"
    if k.flops_f32 > k.flops:
        return "matmul_f32"
    return "matmul" if k.flops else "memory_bound"


def roofline(prog: Program, dev: Device) -> dict:
    by_category = collections.Counter()
    for k in prog.kernels:
        by_category[category(k)] += kernel_time(k, dev) * k.count
    compute = sum(by_category.values())
    comm = sum(collective_time(c, dev) * c.count for c in prog.collectives)
    exposed = sum(exposed_time(c, dev) * c.count for c in prog.collectives)
    return {"compute_s": compute, "collective_s": comm, "exposed_collective_s": exposed, "step_s": compute + exposed,
            "flops": sum((k.flops + k.flops_f32) * k.count for k in prog.kernels),
            "f32_flops": sum(k.flops_f32 * k.count for k in prog.kernels),
            "hbm_bytes": sum(k.bytes * k.count for k in prog.kernels), "compute_by_category_s": dict(by_category)}
