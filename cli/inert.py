"""Text from outside (devices, tools, batch files) made safe to print: no markup, no terminal escapes.

Rich would read ``[bold]`` or ``[/]`` in a device id as markup (and crash on
an unbalanced one), and a terminal would obey an ESC or OSC-8 sequence in a
tool's result. Every such string goes through ``inert`` before it is shown:
a ``rich.text.Text`` (never parsed as markup) with control characters
written out as escapes.
"""

from __future__ import annotations

import json
import re

from rich.text import Text

#: C0 controls but tab and newline, DEL, C1 controls, and the invisible ones that reorder or hide text:
#: Arabic letter mark, zero-width and directional marks, line and paragraph separators, bidi embeddings,
#: overrides and isolates, invisible operators, the byte order mark.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def escaped(text: str) -> str:
    """``text`` with each control character written as ``\\xNN`` or ``\\uNNNN``."""
    return _CONTROL.sub(lambda match: _escape(match.group()), text)


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(value: object, style: str = "") -> Text:
    """Any value as plain text: strings as they are (escaped), anything else as its JSON."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return Text(escaped(text), style=style)
