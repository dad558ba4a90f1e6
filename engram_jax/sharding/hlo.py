"""Reading collectives out of compiled HLO text (for tests and communication benchmarks)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(\([^=]*?\)|[a-z]+[0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+("
                 + "|".join(COLLECTIVES) + r")(-start)?\(([^\n]*)")
_GROUP_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUP_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUP_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_SCATTER_COMPUTATION = re.compile(r"^%all-reduce-scatter[.0-9]* \(.*\) -> (.*) \{$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^ ]+) \(.*\{$")
_NAME = r"%([\w.\-]+)"
_CALLEE = re.compile(r"(?:calls|to_apply|condition)=" + _NAME)
_LOOP_BODY = re.compile(r"body=" + _NAME)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"^\s*%([\w.\-]+) = s32\[\][^ ]* constant\((-?[0-9]+)\)")
_CONDITION = re.compile(r"condition=" + _NAME)
_COMMENT = re.compile(r"/\*.*?\*/")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"\}')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its kind and its result arrays' shapes."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int | None = None  # devices per replica group; None if not stated
    runs: int = 1  # times it runs per run of the program (inside loops: their trip counts)

    @property
    def bytes(self) -> int:
        """Bytes of the result on one device."""
        return sum(_BYTES.get(dtype, 4) * int(np.prod(shape)) for dtype, shape in self.shapes)

    def traffic(self, num_devices: int) -> float:
        """Bytes one device sends with ring algorithms: all-reduce 2(n-1)/n S, all-gather and
        all-to-all (n-1)/n S, reduce-scatter (n-1) S (S the result size), permute S."""
        n = self.group_size or num_devices
        if n <= 1:
            return 0.0
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
                  "all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
                  "collective-permute": 1.0}[self.kind]
        return factor * self.bytes


def _group_size(attributes: str) -> int | None:
    if match := _GROUP_LIST.search(attributes):
        return len([d for d in match.group(1).split(",") if d])
    if match := _GROUP_MESH.search(attributes):
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", match.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2))]))
    if match := _GROUP_IOTA.search(attributes):
        return int(match.group(1).split(",")[-1])
    return None


def _shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                 for dtype, dims in _ARRAY.findall(text))


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """Computation name -> its lines, and the entry computation's name."""
    computations, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        if header := _COMPUTATION.match(line):
            name = header.group(1)
            computations[name] = [line]
            entry = name if line.startswith("ENTRY") else entry
        elif name is not None:
            computations[name].append(line)
            name = None if line.rstrip() == "}" else name
    return computations, entry


def _trip_count(loop: str, computations: dict[str, list[str]]) -> int:
    """Iterations of the while loop on line `loop`: the compiler's `known_trip_count`, else
    the constant of a `counter < constant` condition (how `lax.scan` compiles), else 1."""
    if known := _KNOWN_TRIPS.search(loop):
        return int(known.group(1))
    condition = computations.get(_CONDITION.search(loop).group(1), [])
    called = [computations.get(name, []) for line in condition
              for name in _CALLEE.findall(line)]
    constants = [int(m.group(2)) for line in condition if (m := _CONSTANT.match(line))]
    compares_less = any("direction=LT" in line for lines in [condition, *called]
                        for line in lines)
    return max(constants[0], 1) if compares_less and len(constants) == 1 else 1


def computation_runs(hlo_text: str) -> dict[str, int]:
    """How many times each computation of a compiled program runs per run of the program: a
    loop body its trip count times its caller's runs (every branch of a conditional counted as
    taken)."""
    computations, entry = _split_computations(hlo_text)
    callers: dict[str, list[tuple[str, int]]] = {}
    for caller, lines in computations.items():
        for line in lines[1:]:
            callees = _CALLEE.findall(line)
            if branches := _BRANCHES.search(line):
                callees += re.findall(_NAME, branches.group(1))
            for callee in callees:
                callers.setdefault(callee, []).append((caller, 1))
            if (body := _LOOP_BODY.search(line)) and _CONDITION.search(line):
                callers.setdefault(body.group(1), []).append(
                    (caller, _trip_count(line, computations)))
    runs: dict[str, int] = {}

    def count(name: str) -> int:
        if name not in runs:
            runs[name] = 1 if name == entry or name not in callers else sum(
                count(caller) * factor for caller, factor in callers[name])
        return runs[name]

    for name in computations:
        count(name)
    return runs


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in `hlo_text` (e.g. `jax.jit(f).lower(...).compile().as_text()`), with
    how many times it runs (`computation_runs`: a collective in a scanned layer's body runs once
    per layer).

    TPU programs write a reduce-scatter as a computation named `all-reduce-scatter...` that
    all-reduces its input and keeps this device's slice; its all-reduce is reported as the
    reduce-scatter it is, with the computation's result as its result.
    """
    runs = computation_runs(hlo_text)
    found, scatter_result, computation = [], None, None
    # Long tuples carry /*index=N*/ comments, whose "=" would end a result shape early.
    for line in _COMMENT.sub("", hlo_text).splitlines():
        if header := _COMPUTATION.match(line):
            computation = header.group(1)
        if header := _SCATTER_COMPUTATION.match(line):
            scatter_result = _shapes(header.group(1))
        elif line.rstrip() == "}":
            scatter_result = None
        for result, kind, _, attributes in _OP.findall(line):
            if kind == "all-reduce" and scatter_result is not None:
                kind, shapes = "reduce-scatter", scatter_result
            else:
                shapes = _shapes(result)
            found.append(Collective(kind, shapes, _group_size(attributes),
                                    runs.get(computation, 1)))
    return found


def traffic_by_kind(hlo_text: str, num_devices: int) -> dict[str, float]:
    """Bytes one device sends per run of the program, by kind of collective (ring estimate;
    each collective times the runs of its computation)."""
    totals = {kind: 0.0 for kind in COLLECTIVES}
    for op in collectives(hlo_text):
        totals[op.kind] += op.traffic(num_devices) * op.runs
    return totals
