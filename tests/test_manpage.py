"""The man page: generated from ``--help``, committed, and valid roff.

The committed ``docs/viamillipede.1`` must equal what :func:`viamillipede.manpage.render` makes
of the current help text, so the page cannot drift from ``--help``; regenerate it with
``python -m viamillipede.manpage > docs/viamillipede.1``.  Rendering with groff or man is
checked only where those tools are installed (under VIAMILLIPEDE_REQUIRE_LAB=1, as in CI, a
missing tool fails instead); the equality check never depends on them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from harness import require_or_skip
from viamillipede import manpage
from viamillipede.cli import HELP
from viamillipede.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "viamillipede.1"
REGENERATE = "python -m viamillipede.manpage > docs/viamillipede.1"


def test_committed_page_is_generated_from_help() -> None:
    assert PAGE.read_text() == manpage.render(), f"docs/viamillipede.1 is stale: run {REGENERATE}"


def test_module_prints_the_page() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "viamillipede.manpage"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert proc.stdout == manpage.render()
    assert proc.stderr == ""


def test_page_has_every_help_section() -> None:
    page = manpage.render()
    headings = re.findall(r"^\.SH (.+)$", page, re.MULTILINE)
    assert headings[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"]
    for wanted in ("EXAMPLES", "OPTIONS", "UNITS", "SIGNALS", "EXIT STATUS", "SEE ALSO"):
        assert wanted in headings
    assert page.startswith(".TH VIAMILLIPEDE 1 ")


def test_every_exit_code_is_listed_once() -> None:
    page = manpage.render()
    section = page.split(".SH EXIT STATUS\n", 1)[1].split(".SH ", 1)[0]
    codes = [int(c) for c in re.findall(r"^\\fB(\d+)\\fR$", section, re.MULTILINE)]
    assert codes == sorted(int(c) for c in ExitCode)


def test_units_are_a_table_on_the_page() -> None:
    """The unit convention is a section of its own, laid out as terms and descriptions (not
    the preformatted fallback for text the renderer does not understand)."""
    page = manpage.render()
    section = page.split(".SH UNITS\n", 1)[1].split(".SH ", 1)[0]
    assert ".nf" not in section
    assert section.startswith(".TP\n\\fBBYTES, RATE\\fR\n")
    assert "2M = 2000000" in section and "2KiB = 2048" in section


def test_every_option_of_the_help_is_on_the_page() -> None:
    page = manpage.render().replace("\\-", "-")
    indented = "\n".join(line for line in HELP.splitlines() if line.startswith("  "))
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", indented))
    assert len(flags) > 15
    for flag in sorted(flags):
        assert f"\\fB{flag}\\fR" in page, flag
    for word in ("rx", "tx", "threads", "checksum", "checkphrase", "timeout", "verbose",
                 "chaos", "limit", "retry-resolve"):
        assert f"\\fB{word}\\fR" in page, word


def test_parse_help_finds_the_parts() -> None:
    parsed = manpage.parse_help(HELP)
    assert len(parsed.usage) == 3  # rx, tx, tx --ssh
    assert all(line.startswith("viamillipede ") for line in parsed.usage)
    assert parsed.description.startswith("Carry a Unix pipe")
    assert [s.key for s in parsed.sections] == [
        "Examples", "Words", "Units", "Signals", "Exit status"
    ]


def test_unknown_section_is_kept_verbatim() -> None:
    text = "usage: x\n\nDoes x.\n\nOdd bits:\n  .dot first\n  \\ back\n"
    parsed = manpage.parse_help(text)
    assert parsed.sections[0].heading == "Odd bits"
    lines = manpage._render_verbatim(parsed.sections[0])
    assert lines == [".nf", "  .dot first", "  \\e back", ".fi"]
    assert manpage._line(".starts with a dot") == "\\&.starts with a dot"
    assert manpage._line("'quote") == "\\&'quote"


def test_groff_renders_without_warnings() -> None:
    require_or_skip(None if shutil.which("groff") else "groff is not installed (groff-base)")
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww"], input=manpage.render(), capture_output=True,
        text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "VIAMILLIPEDE(1)" in proc.stdout
    assert proc.stderr == ""


def test_man_renders_without_warnings(tmp_path: Path) -> None:
    require_or_skip(None if shutil.which("man") else "man is not installed (man-db)")
    page = tmp_path / "viamillipede.1"
    page.write_text(manpage.render())
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "MANPAGER": "cat",
           "PAGER": "cat"}
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "VIAMILLIPEDE(1)" in proc.stdout
    assert proc.stderr == ""
