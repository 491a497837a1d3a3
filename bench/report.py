"""Markdown table of a pytest-benchmark JSON from bench/: median time, GB/s, share of the copy
bandwidth measured in the same run, and speed-up over the eager formula.

    python bench/report.py RESULTS.json [--out TABLE.md]
"""

import argparse
import json
import sys
from collections import OrderedDict


def table(data) -> str:
    info = data.get("machine_info", {}).get("ag_kernels", {})
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    lines = [
        f"torch {info.get('torch')}, triton {info.get('triton')}, {info.get('date')}",
        f"CPU: {info.get('cpu')}; GPU: {info.get('cuda')}",
        "",
        "| group | case | median | GB/s | % of copy GB/s | x eager |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for group, rows in groups.items():
        medians = {r["extra_info"]["case"]: r["stats"]["median"] for r in rows}
        copy_gbs = None
        if "copy" in medians:
            copy = next(r for r in rows if r["extra_info"]["case"] == "copy")
            copy_gbs = copy["extra_info"]["bytes"] / medians["copy"] / 1e9
        for r in rows:
            case, median = r["extra_info"]["case"], r["stats"]["median"]
            gbs = r["extra_info"]["bytes"] / median / 1e9
            share = f"{100 * gbs / copy_gbs:.0f}%" if copy_gbs else "-"
            speedup = f"{medians['eager'] / median:.2f}" if "eager" in medians and case != "copy" else "-"
            unit = f"{median * 1e3:.2f} ms" if median >= 1e-3 else f"{median * 1e6:.1f} us"
            lines.append(f"| {group} | {case} | {unit} | {gbs:.1f} | {share} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="output of pytest --benchmark-json")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        text = table(json.load(f))
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
