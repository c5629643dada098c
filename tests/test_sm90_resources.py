"""The ptxas -v parser behind the sm_90 compile tests finds a spill, so that those tests can fail on one."""

import sm90_resources
from sm90_resources import Resources, parse_ptxas, spill_message

# nvcc -Xptxas=-v -maxrregcount=24 on a kernel that holds 64 floats per thread (ptxas 13.0), and a non-inlined device
# function's properties (no "Used" line: not an entry).
LOG = """ptxas info    : Overriding maximum register limit 256 for '_Z5heavyPfPKfi' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5heavyPfPKfi' for 'sm_90'
ptxas info    : Function properties for _Z5heavyPfPKfi
    12464 bytes stack frame, 12460 bytes spill stores, 27192 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 12464 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Compile time = 2219.319 ms
ptxas info    : Compiling entry function 'light' for 'sm_90a'
ptxas info    : Function properties for light
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 448 bytes cmem[0]
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_parse_ptxas_reads_registers_spills_and_smem():
    assert parse_ptxas(LOG) == {
        "_Z5heavyPfPKfi": dict(registers=24, stack=12464, spill_stores=12460, spill_loads=27192, smem=1024),
        "light": dict(registers=40, stack=0, spill_stores=0, spill_loads=0, smem=0),
        "__internal_trig_reduction_slowpathd": dict(registers=None, stack=40, spill_stores=0, spill_loads=0, smem=0),
    }


def test_spill_message_names_only_the_spilling_kernels():
    records = [Resources(kernel=name, specialisation="", **fields) for name, fields in parse_ptxas(LOG).items()]
    message = spill_message("heavy.cu", records)
    assert "1 kernel(s) spill" in message and "_Z5heavyPfPKfi" in message and "light" not in message
    assert spill_message("heavy.cu", records[1:]) == ""


def test_report_merges_the_sections_of_separate_tests(tmp_path, monkeypatch):
    monkeypatch.setattr(sm90_resources, "REPORT_DIR", str(tmp_path))
    records = [Resources(kernel=name, specialisation="", **fields) for name, fields in parse_ptxas(LOG).items()]
    sm90_resources.report("cuda", "title", "b.cu", records[1:])
    sm90_resources.report("cuda", "title", "a.cu", records[:1], [["A=1", "RuntimeError: boom"]])
    text = (tmp_path / "cuda.txt").read_text()
    assert text.startswith(
        "title\n3 kernels: max 40 registers, max stack 12464 B, max smem 1024 B, 1 spilling, 1 failed to compile\n"
    )
    assert (
        text.index("== a.cu")
        < text.index("_Z5heavyPfPKfi")
        < text.index("FAILED TO COMPILE: A=1")
        < text.index("== b.cu")
        < text.index("light")
    )
