"""The README's "Use" snippet runs as written (on the embedded default model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_use_snippet_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Use") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Use)", "exec"), {})
    out = capsys.readouterr().out
    assert "To be, or not to be" in out and "hit rate" in out
