"""Cards this tool wrote, on disk: the stamp that marks one as ours and unedited, and atomic replacement.

A card we write ends with `<!-- moe-surgery:card sha256=... -->`, the hash of everything before it; a README
whose stamp still matches may be regenerated, any other was written or edited by a person.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_STAMP_RE = re.compile(r"\n<!-- moe-surgery:card sha256=([0-9a-f]{64}) -->\n\Z")


def stamp(content: str) -> str:
    return f"{content}\n<!-- moe-surgery:card sha256={_sha256(content)} -->\n"


def unstamp(text: str) -> str | None:
    """The card without its stamp when the stamp matches (an unedited card of ours), else None."""
    m = _STAMP_RE.search(text)
    if m is None or _sha256(text[: m.start()]) != m[1]:
        return None
    return text[: m.start()]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_card(readme: Path, content: str) -> None:
    replace_card(readme, stamp(content))


def replace_card(readme: Path, text: str) -> None:
    """Written whole or not at all: cards are also rewritten in finished folders (`eval`, `heal`)."""
    part = readme.with_name(f".{readme.name}.moe-surgery-part")
    try:
        part.write_text(text, encoding="utf-8")
        os.replace(part, readme)
    finally:
        part.unlink(missing_ok=True)
