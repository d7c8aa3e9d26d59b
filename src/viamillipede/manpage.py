"""The manual page, generated from the ``--help`` text.

``--help`` is the one place where the command line is documented; writing the man page by hand
would give a second text that drifts from it.  So this module parses :data:`cli.HELP` into its
parts (usage, description, then the titled sections) and renders each as roff for ``man -l``.
``docs/viamillipede.1`` is its output, and a test checks that the committed file still equals
:func:`render`, so changing the help without regenerating the page fails the suite::

    python -m viamillipede.manpage > docs/viamillipede.1

The parser stays deliberately small and forgiving: a section it does not recognise is still
rendered, as preformatted text, so a new section in the help cannot vanish from the page.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__
from .cli import HELP, PROG
from .errors import ExitCode

#: Help section titles and the man page section each becomes; unknown titles are upper-cased.
_TITLES = {
    "Examples": "EXAMPLES",
    "Words": "OPTIONS",
    "Units": "UNITS",
    "Signals": "SIGNALS",
    "Exit status": "EXIT STATUS",
}


@dataclass(frozen=True)
class Section:
    """One titled block of the help: its heading line (without the colon) and its lines."""

    heading: str
    lines: tuple[str, ...]

    @property
    def key(self) -> str:
        """The heading's first words, before any parenthesis ("Words (the original...")."""
        return self.heading.split(" (", 1)[0].split(" and ", 1)[0].strip()


@dataclass(frozen=True)
class Help:
    """The help text taken apart."""

    usage: tuple[str, ...]
    description: str
    sections: tuple[Section, ...]


def parse_help(text: str) -> Help:
    """Split the help into usage lines, the description paragraph and titled sections.

    Blocks are separated by blank lines; a block whose first line starts at the margin and ends
    with a colon is a titled section, the first block is the usage, the next untitled one the
    description.
    """
    blocks = [b.splitlines() for b in re.split(r"\n\s*\n", text.strip("\n")) if b.strip()]
    if not blocks or not blocks[0][0].startswith("usage:"):
        raise ValueError("the help text does not start with 'usage:'")
    usage = tuple(line.removeprefix("usage:").strip() for line in blocks[0])
    description: list[str] = []
    sections: list[Section] = []
    for block in blocks[1:]:
        first = block[0]
        if first.endswith(":") and not first[:1].isspace():
            sections.append(Section(first[:-1], tuple(block[1:])))
        elif sections:  # an untitled paragraph after a section belongs to it
            last = sections.pop()
            sections.append(Section(last.heading, (*last.lines, "", *block)))
        else:
            description.extend(block)
    return Help(usage, " ".join(line.strip() for line in description), tuple(sections))


# -- roff ---------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Roff-safe text: backslashes escaped, and option dashes as real minus signs (``\\-``) so
    that ``--flag`` copied from the rendered page still works."""
    text = text.replace("\\", "\\e")
    return re.sub(r"(?<![\w/.])-[\w-]*", lambda m: m.group(0).replace("-", "\\-"), text)


def _line(text: str) -> str:
    """One input line; a leading dot or quote would be read as a request, so guard it."""
    text = _escape(text)
    return "\\&" + text if text[:1] in (".", "'") else text


def _literal(text: str) -> str:
    """Text to be shown as typed (commands, option names): every dash is a minus sign."""
    return _line(text).replace("\\-", "-").replace("-", "\\-")


def _synopsis_word(word: str) -> str:
    """Bold for what is typed literally, italic for placeholders (upper-case words)."""
    core = word.strip("[]")
    if not core or core == "...":
        return _literal(word)
    font = "I" if core.isupper() or core == "options" else "B"
    left, right = word[: word.index(core)], word[word.index(core) + len(core):]
    return f"{_literal(left)}\\f{font}{_literal(core)}\\fR{_literal(right)}"


def _option_head(head: str) -> str:
    """``rx PORT  --rx PORT`` or ``--verbose N, -v`` as ``.TP`` tag: names bold, values
    italic, the spellings separated by commas."""
    spellings = [s for part in re.split(r"\s{2,}", head.strip()) for s in part.split(", ")]
    shown = []
    for spelling in spellings:
        words = spelling.split()
        shown.append(" ".join(
            f"\\fI{_literal(w)}\\fR" if w.isupper() and i else f"\\fB{_literal(w)}\\fR"
            for i, w in enumerate(words)
        ))
    return ", ".join(shown)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _table(lines: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """Two-column help (term, then its description, continued on indented lines) as pairs;
    None when the lines do not look like that.  The description column is where the
    continuation lines start."""
    continued = [_indent(line) for line in lines if line.strip() and _indent(line) > 2]
    if not continued:
        return None
    column = Counter(continued).most_common(1)[0][0]
    rows: list[tuple[str, list[str]]] = []
    for line in lines:
        if not line.strip():
            continue
        head, text = line[:column].strip(), line[column:].strip()
        if head:
            if not text or line[column - 1] != " ":
                return None  # the term runs into the description column: not a table
            rows.append((head, [text]))
        elif rows:
            rows[-1][1].append(text)
        else:
            return None
    return [(head, " ".join(text)) for head, text in rows]


def _exit_codes(lines: tuple[str, ...]) -> list[tuple[int, str]]:
    """The exit status table, laid out in two columns in the help, as (code, meaning) sorted
    by code.  A code is a number of :class:`ExitCode` at the start of an entry."""
    known = {int(c) for c in ExitCode}
    entries: list[tuple[int, str]] = []
    for line in lines:
        starts = [m for m in re.finditer(r"(?<!\S)(\d+) (?=\S)", line)
                  if int(m.group(1)) in known]
        if not starts:
            continue  # a line without an entry of its own
        for m, nxt in zip(starts, [*starts[1:], None], strict=True):
            end = nxt.start() if nxt else len(line)
            entries.append((int(m.group(1)), line[m.end():end].strip()))
    return sorted(entries)


def _render_examples(section: Section) -> list[str]:
    out: list[str] = []
    for raw in section.lines:
        text = raw.strip()
        if not text:
            continue
        if text.startswith("#"):
            comment = text.lstrip("# ")
            out += [".PP", _line(comment[:1].upper() + comment[1:])]
        else:
            out += [".RS 4", ".nf", f"\\fB{_literal(text)}\\fR", ".fi", ".RE"]
    return out


def _render_table(section: Section, tag: Callable[[str], str]) -> list[str]:
    rows = _table(section.lines)
    if rows is None:
        return _render_verbatim(section)
    out: list[str] = []
    for head, text in rows:
        out += [".TP", tag(head), _line(text)]
    return out


def _render_exit(section: Section) -> list[str]:
    entries = _exit_codes(section.lines)
    if not entries:
        return _render_verbatim(section)
    out: list[str] = []
    for code, text in entries:
        out += [".TP", f"\\fB{code}\\fR", _line(text)]
    return out


def _render_verbatim(section: Section) -> list[str]:
    return [".nf", *(_line(line) for line in section.lines), ".fi"]


def render() -> str:
    """The man page (section 1) as roff text, from the same help text ``--help`` prints."""
    helptext = parse_help(HELP)
    first_sentence = helptext.description.split(".  ", 1)[0].rstrip(".")
    name_line = first_sentence[:1].lower() + first_sentence[1:]
    out = [
        f'.TH {PROG.upper()} 1 "" "{PROG} {__version__}" "User Commands"',
        ".SH NAME",
        f"{PROG} \\- {_line(name_line)}",
        ".SH SYNOPSIS",
    ]
    for usage in helptext.usage:
        out += [" ".join(_synopsis_word(w) for w in usage.split()), ".br"]
    out += [".SH DESCRIPTION"]
    # One sentence per line, the roff convention (it then spaces sentence ends itself).
    out += [_line(s) for s in re.split(r"(?<=[.!?])\s{2,}", helptext.description)]
    for section in helptext.sections:
        title = _TITLES.get(section.key, section.key.upper())
        out += [".SH " + _escape(title)]
        if title == "EXAMPLES":
            out += _render_examples(section)
        elif title == "OPTIONS":
            if section.heading != section.key:
                out += [_line(section.heading + ":")]
            out += _render_table(section, _option_head)
        elif title == "EXIT STATUS":
            out += _render_exit(section)
        else:
            out += _render_table(section, lambda head: f"\\fB{_literal(head)}\\fR")
    out += [
        ".SH SEE ALSO",
        "\\fBpv\\fR(1), \\fBnc\\fR(1);",
        "docs/stats.md (statistics, signals and verbosity) and docs/protocol.md (the wire",
        "protocol) in the source distribution.",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
