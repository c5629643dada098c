"""Registers, spills and shared memory of the sm_90 kernels, read from ptxas's -v log, checked and reported.

tests/test_triton_compile.py (the log of the ptxas run inside Triton's own compile) and tests/test_cuda_compile.py
(nvcc -Xptxas -v) parse the log into one record per kernel. A kernel that spills fails its test: a spill is local
memory traffic (through L1, to HBM when it misses) inside loops that are meant to stream the logits once with their
tiles held in registers. With KDKERNELS_SPILL_REPORT=<dir> the tests also write the
records as tables, <dir>/triton-<version>.txt and <dir>/cuda.txt (next to them the same records as JSON, which is how
tests in other pytest-xdist workers add their sections to one file); without it nothing is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass

REPORT_DIR = os.environ.get("KDKERNELS_SPILL_REPORT")


@dataclass
class Resources:
    """One kernel's resources as ptxas reports them (bytes, per thread except smem, which is per block)."""

    kernel: str
    specialisation: str  # what tells apart the compilations of one kernel (constexprs, template arguments)
    registers: int | None  # None: a function ptxas did not compile as an entry (a non-inlined device function)
    stack: int
    spill_stores: int
    spill_loads: int
    smem: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{function: its fields of Resources} from a ptxas -v log, in the log's order. Every function with a "Function
    properties" line is there (its stack and spills), an entry function also with its registers and static smem."""
    functions: dict[str, dict] = {}
    entry = properties = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            functions.setdefault(entry, dict(registers=None, stack=0, spill_stores=0, spill_loads=0, smem=0))
        elif m := _PROPERTIES.search(line):
            properties = m.group(1)
            functions.setdefault(properties, dict(registers=None, stack=0, spill_stores=0, spill_loads=0, smem=0))
        elif (m := _FRAME.search(line)) and properties is not None:
            stack, stores, loads = map(int, m.groups())
            functions[properties].update(stack=stack, spill_stores=stores, spill_loads=loads)
            properties = None
        elif (m := _USED.search(line)) and entry is not None:
            smem = _SMEM.search(line)
            functions[entry].update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            entry = None
    return functions


def table(records: list[Resources]) -> str:
    """The records as aligned text columns, one kernel a line."""
    head = ("kernel", "registers", "stack", "spill st", "spill ld", "smem", "specialisation")
    rows = [head] + [
        (
            r.kernel,
            "-" if r.registers is None else str(r.registers),
            str(r.stack),
            str(r.spill_stores),
            str(r.spill_loads),
            str(r.smem),
            r.specialisation,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])] + [row[-1]]).rstrip()
        for row in rows
    )


def summary(records: list[Resources], failures: list) -> str:
    """One line: how many kernels, the most registers, stack and smem of any, how many spill and how many failed to
    compile."""
    regs = [r.registers for r in records if r.registers is not None]
    return (
        f"{len(records)} kernels: max {max(regs, default=0)} registers, max stack "
        f"{max((r.stack for r in records), default=0)} B, max smem {max((r.smem for r in records), default=0)} B, "
        f"{sum(r.spills for r in records)} spilling" + (f", {len(failures)} failed to compile" if failures else "")
    )


def spill_message(what: str, records: list[Resources]) -> str:
    """The failure message for the records that spill ("" when none does)."""
    spilled = [r for r in records if r.spills]
    return f"{what}: {len(spilled)} kernel(s) spill registers to local memory:\n{table(spilled)}" if spilled else ""


def report(name: str, title: str, section: str, records: list[Resources], failures: list = ()) -> None:
    """With KDKERNELS_SPILL_REPORT set: puts the records of one test (a section: a kernel family, a source file) and
    its compile failures ([specialisation, error] pairs) into <dir>/<name>.json and rewrites <dir>/<name>.txt from
    all sections there, under a lock (tests that run at the same time in other xdist workers write other sections of
    the same file)."""
    if not REPORT_DIR:
        return
    os.makedirs(REPORT_DIR, exist_ok=True)
    with open(os.path.join(REPORT_DIR, name + ".json"), "a+") as store:
        fcntl.flock(store, fcntl.LOCK_EX)
        store.seek(0)
        sections = json.loads(store.read() or "{}")
        sections[section] = dict(records=[asdict(r) for r in records], failures=list(failures))
        store.seek(0)
        store.truncate()
        json.dump(sections, store, indent=1)
        parsed = {
            key: ([Resources(**r) for r in part["records"]], part["failures"]) for key, part in sorted(sections.items())
        }
        everything = summary([r for rs, _ in parsed.values() for r in rs], [f for _, fs in parsed.values() for f in fs])
        parts = [f"{title}\n{everything}"]
        for key, (rs, fs) in parsed.items():
            failed = "".join(
                f"\nFAILED TO COMPILE: {label}\n  " + "\n  ".join(error.splitlines()) for label, error in fs
            )
            parts.append(f"== {key}: {summary(rs, fs)}\n{table(rs)}{failed}")
        with open(os.path.join(REPORT_DIR, name + ".txt"), "w") as text:
            text.write("\n\n".join(parts) + "\n")
