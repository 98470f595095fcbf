"""The GPU check script (benchmarks/gpu/check.py) end to end at tiny sizes on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"\d")


@pytest.fixture
def check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the script imports its siblings as benchmarks.*
    from benchmarks.gpu import check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation on a busy machine
    yield check
    torch.set_num_threads(threads)


def _rows(text: str) -> list[list[str]]:
    """The table's body rows, as lists of cells (header and separator left out)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_tiny_cpu_check_writes_a_row_with_numbers_for_every_section(check, tmp_path):
    out = check.main(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "sub" / "check.md")])
    text = out.read_text()
    assert out == tmp_path / "sub" / "check.md" and text.startswith("# GPU check: CPU (")
    rows = _rows(text)
    assert {r[0] for r in rows} == set(check.SECTIONS)
    failed = [r for r in rows if r[1] in ("error", "skipped") or r[2] == "error"]
    assert not failed, failed
    for section in check.SECTIONS:
        numeric = [r for r in rows if r[0] == section and any(NUMBER.search(c) for c in r[2:5])]
        assert numeric, f"no numbers in the {section} rows"
    ratios = [r[4] for r in rows if r[0] in ("janus", "flow") and r[4] != "-"]
    assert len(ratios) >= 4 and all(re.fullmatch(r"\d+\.\d\dx", x) for x in ratios)
    totals = [float(r[2].split()[0]) for r in rows if r[1].endswith(": total")]
    assert len(totals) == 2 and all(t > 0 for t in totals)
    memory = [r for r in rows if r[0] == "memory"]
    assert len(memory) == 4 and all(r[2] == "-" and NUMBER.search(r[3]) for r in memory)  # CPU: plan only
    assert all(r[4] == "-" for r in rows if r[1] == "update MFU")  # no bf16 peak for a CPU


def test_a_failing_section_is_an_error_row_and_the_others_still_run(check, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(check.RUNNERS, "flow", broken)
    out = check.main(["--size", "tiny", "--device", "cpu", "--sections", "memory,flow",
                      "--out", str(tmp_path / "check.md")])
    rows = _rows(out.read_text())
    assert [r[:2] for r in rows] == [["flow", "error"], ["memory", "no phase measured"]]
    assert "RuntimeError: out of memory" in rows[0][5]
    with pytest.raises(SystemExit):
        check.main(["--sections", "janus,nope", "--device", "cpu"])
