"""Check that moving text into the manual lost nothing: every code span, flag, upper-case name
(environment variables, constants) and figure of an older README.md appears somewhere in today's
README.md or docs/**/*.md.

    python tools/docs_coverage.py REV        # the README.md of git revision REV, e.g. main~5
    python tools/docs_coverage.py FILE.md    # or any Markdown file

Prints what is missing and exits 1 if anything is.  Tokens are compared with whitespace
normalized; a figure counts with its unit (%, x, us, ms, s, GB/s, MB, GB, min, nats).
"""

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE = (r"(?<![\w.])[-+−]?\d+(?:[.,]\d+)*(?:e-?\d+)?"
          r"(?:\s?(?:%|x|us|ms|s|GB/s|MB|GB|min|nats))?(?![\w.])")


def tokens(text: str) -> set:
    found = set(re.findall(r"`([^`\n]+)`", text))
    found |= set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    found |= set(re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", text))
    found |= set(re.findall(FIGURE, text))
    return found


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    source = argv[0]
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            old = f.read()
    else:
        old = subprocess.run(["git", "show", f"{source}:README.md"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    norm = lambda t: re.sub(r"\s+", " ", t)  # noqa: E731
    new = norm("\n".join(open(p, encoding="utf-8").read() for p in pages))
    wanted = tokens(old)
    missing = sorted(t for t in wanted if norm(t) not in new)
    for t in missing:
        print(f"missing: {t!r}")
    print(f"{len(wanted)} tokens of {source} checked, {len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
