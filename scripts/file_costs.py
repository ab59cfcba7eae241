"""Write tests/file_costs.json from a pytest ``--durations=0`` log, or a ``--junitxml`` report
(each test's setup, call and teardown), of a measured run: seconds per test file.

``make test`` hands files to its xdist workers longest first (tests/conftest.py orders the
collection by these costs; ``--no-loadscope-reorder`` keeps that order), so a long file does
not start last and hold one worker while the others sit idle. Run it on the log of a quiet
run and commit the result: ``python scripts/file_costs.py run.log`` (or ``report.xml``). A file it does not list
is costed by its directory (tests/conftest.py ``DIR_COST``).
"""

from __future__ import annotations

import collections
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LINE = re.compile(r"([\d.]+)s (?:setup|call|teardown)\s+(tests/\S+?\.py)::")


def costs(log: str) -> dict[str, float]:
    total: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        if m := LINE.match(line):
            total[m.group(2)] += float(m.group(1))
    return {f: round(s, 1) for f, s in sorted(total.items(), key=lambda kv: -kv[1])}


def costs_from_junit(report: str) -> dict[str, float]:
    """The same from a junit report: a test case's ``time`` is its setup, call and teardown."""
    total: collections.Counter[str] = collections.Counter()
    for case in ET.fromstring(report).iter("testcase"):
        total[case.get("classname", "").replace(".", "/") + ".py"] += float(case.get("time", 0))
    return {f: round(s, 1) for f, s in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> None:
    text = Path(sys.argv[1]).read_text()
    found = costs_from_junit(text) if sys.argv[1].endswith(".xml") else costs(text)
    if not found:
        raise SystemExit(f"no durations in {sys.argv[1]} (run pytest with --durations=0)")
    out = Path(__file__).resolve().parent.parent / "tests" / "file_costs.json"
    out.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{out}: {len(found)} files, {sum(found.values()):.0f} s")


if __name__ == "__main__":
    main()
