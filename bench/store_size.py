"""Issue 16's code-size goal: the job-state store package against the one module it replaced.

    .venv/bin/python bench/store_size.py                 # this tree's store against state.py at 78c4130^

Counts, per file, all lines and code lines (not blank, not comment-only, not inside a docstring;
from the tokenizer), for the store package's modules in this tree and for the old
``common/imgsift_common/state.py`` (Lua over Redis and Python over SQLite) read from git at
``--old`` (the last commit before the SQL store). The Alembic revisions are history and are not
counted.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ["state.py", "sqlstate.py", "sqldialect.py", "schema.py"]
SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
        tokenize.ENDMARKER}  # fmt: skip
STARTS = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def count(source: str) -> tuple[int, int]:
    """(lines, code lines) of a Python source."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    code: set[int] = set()
    for i, token in enumerate(tokens):
        if token.type in SKIP:
            continue
        if token.type == tokenize.STRING:  # a docstring is a string that is a whole statement
            before = next((t for t in reversed(tokens[:i]) if t.type not in (tokenize.COMMENT, tokenize.NL)), None)
            after = next(t for t in tokens[i + 1 :] if t.type != tokenize.COMMENT)
            if (before is None or before.type in STARTS) and after.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                continue
        code.update(range(token.start[0], token.end[0] + 1))
    return len(source.splitlines()), len(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="78c4130^", help="git revision holding the old state.py")
    args = parser.parse_args()
    package = ROOT / "common" / "imgsift_common"
    total = [0, 0]
    for name in PACKAGE:
        lines, code = count((package / name).read_text())
        total = [total[0] + lines, total[1] + code]
        print(f"{name:16} {lines:6,} lines {code:6,} code lines")
    print(f"{'store package':16} {total[0]:6,} lines {total[1]:6,} code lines")
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old}:common/imgsift_common/state.py"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    lines, code = count(old)
    print(f"{'old state.py':16} {lines:6,} lines {code:6,} code lines ({args.old})")
    print(f"goal (shorter than the old module): {'met' if total[0] < lines else 'NOT met'}")


if __name__ == "__main__":
    main()
