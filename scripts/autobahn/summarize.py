#!/usr/bin/env python3
"""Summarize an Autobahn|Testsuite fuzzingclient report (index.json); Python 3 stdlib only.

Usage: summarize.py [--markdown] [--wstest-log FILE | --expected N] INDEX_JSON

Strict rule: a case passes only when its behavior is OK or INFORMATIONAL *and* its
behaviorClose is OK or INFORMATIONAL. Everything else fails: NON-STRICT, FAILED,
UNIMPLEMENTED, WRONG CODE, UNCLEAN, ... and cases that never produced a result.

Missing cases: with --wstest-log, the wstest output is read for the lines
"Ok, will run N test cases against S servers" and "Cases = [...]"; every announced case
without a result in index.json fails as MISSING (listed by id). With --expected N only the
count is known. With --wstest-log, a log that lacks the "will run" line is an error.

Output, in this order:
  1. per-behavior breakdown (behavior and behaviorClose counts)
  2. per-case-group table (group = first number of the case id); --markdown makes it a
     markdown table, ready for docs/conformance.md
  3. each failed case with its behavior and close behavior
  4. last line: "autobahn: N passed, M failed"
Exit status: 0 iff M == 0 and N > 0; 1 otherwise; 2 on usage or input errors.
"""
import argparse
import ast
import collections
import json
import re
import sys

PASS = {"OK", "INFORMATIONAL"}
MISSING = "MISSING"
MAX_MISSING_LISTED = 30

# From autobahntestsuite/case/__init__.py (CaseCategories).
CATEGORIES = {
    0: "Handshake",
    1: "Framing",
    2: "Pings/Pongs",
    3: "Reserved Bits",
    4: "Opcodes",
    5: "Fragmentation",
    6: "UTF-8 Handling",
    7: "Close Handling",
    8: "Misc",
    9: "Limits/Performance",
    10: "Misc",
    12: "WebSocket Compression (different payloads)",
    13: "WebSocket Compression (different parameters)",
}


def case_key(cid):
    return tuple(int(p) if p.isdigit() else 0 for p in cid.split("."))


def group_of(cid):
    head = cid.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def read_wstest_log(path):
    """Return (expected_count, [case ids] or None) from wstest's fuzzingclient output."""
    with open(path, errors="replace") as f:
        text = f.read()
    m = re.search(r"^Ok, will run (\d+) test cases(?: against (\d+) servers)?", text, re.M)
    if not m:
        raise ValueError(f"{path}: no 'Ok, will run N test cases' line (did wstest start?)")
    servers = int(m.group(2) or 1)
    expected = int(m.group(1)) * servers
    ids = None
    c = re.search(r"^Cases = (\[.*\])\s*$", text, re.M)
    if c:
        try:
            ids = [str(x) for x in ast.literal_eval(c.group(1))]
        except (ValueError, SyntaxError):
            ids = None
    return expected, ids


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Summarize an Autobahn|Testsuite index.json (strict rule).",
        epilog="Last line printed: 'autobahn: N passed, M failed'; exit 0 iff M == 0 and N > 0.",
    )
    p.add_argument("index_json")
    p.add_argument("--markdown", action="store_true", help="print tables as markdown")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wstest-log", metavar="FILE", help="wstest output: gives the announced cases")
    g.add_argument("--expected", type=int, metavar="N", help="number of results expected")
    return p.parse_args(argv)


def table(headers, rows, markdown, align):
    """Render rows as a markdown or plain aligned table. align: 'l'/'r' per column."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def fmt(row):
        out = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return ("| " + " | ".join(out) + " |") if markdown else "  ".join(out).rstrip()

    lines = [fmt(headers)]
    if markdown:
        lines.append("|" + "|".join((":" if a == "l" else "-") + "-" * w + (":" if a == "r" else "-")
                                    for w, a in zip(widths, align)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def main(argv):
    args = parse_args(argv)
    try:
        announced = None
        expected = args.expected
        if args.wstest_log:
            expected, announced = read_wstest_log(args.wstest_log)
        try:
            with open(args.index_json) as f:
                index = json.load(f)
        except FileNotFoundError:
            if not args.wstest_log:
                raise
            # wstest writes index.json only at its very end: it was killed or crashed.
            print(f"summarize: {args.index_json} is missing: wstest did not finish; "
                  "every announced case counts as failed", file=sys.stderr)
            index = {}
        if not isinstance(index, dict):
            raise ValueError(f"{args.index_json}: top level is not an object")
    except (OSError, ValueError) as e:
        print(f"summarize: {e}", file=sys.stderr)
        print("autobahn: 0 passed, 1 failed")
        return 2

    agents = sorted(index)
    results = []  # (agent, case id, behavior, behaviorClose)
    for agent in agents:
        for cid, r in index[agent].items():
            results.append((agent, cid, r.get("behavior"), r.get("behaviorClose"), r.get("duration") or 0))

    # Cases announced by wstest but absent from the report (server died, refused, hung up).
    if announced is not None:
        for agent in agents or ["?"]:
            have = set(index.get(agent, {}))
            for cid in announced:
                if cid not in have:
                    results.append((agent, cid, MISSING, MISSING, 0))
    unattributed = 0
    if expected is not None and expected > len(results):
        unattributed = expected - len(results)  # count known, ids unknown

    passed = [r for r in results if r[2] in PASS and r[3] in PASS]
    failed = [r for r in results if not (r[2] in PASS and r[3] in PASS)]
    n_failed = len(failed) + unattributed
    md = args.markdown

    # 1. per-behavior breakdown
    beh = collections.Counter(r[2] for r in results)
    close = collections.Counter(r[3] for r in results)
    if unattributed:
        beh[MISSING] += unattributed
        close[MISSING] += unattributed
    order = {"OK": 0, "INFORMATIONAL": 1}
    names = sorted(set(beh) | set(close), key=lambda b: (order.get(b, 2), str(b)))
    print(f"Autobahn|Testsuite results for {', '.join(agents) or '(no agent)'}:")
    print()
    print(table(["Result", "behavior", "behaviorClose"],
                [[str(b), beh.get(b, 0), close.get(b, 0)] for b in names], md, "lrr"))
    print()

    # 2. per-case-group table
    groups = collections.defaultdict(lambda: collections.Counter())
    for agent, cid, b, bc, dur in results:
        g = groups[group_of(cid)]
        g["cases"] += 1
        g["OK" if b == "OK" else "INFORMATIONAL" if b == "INFORMATIONAL" else "other"] += 1
        g["failed"] += 0 if (b in PASS and bc in PASS) else 1
        g["ms"] += dur
    rows = []
    total = collections.Counter()
    for gid in sorted(groups):
        g = groups[gid]
        total.update(g)
        rows.append([str(gid) if gid >= 0 else "?", CATEGORIES.get(gid, "?"), g["cases"], g["OK"],
                     g["INFORMATIONAL"], g["other"], g["failed"], f"{g['ms'] / 1000:.1f}"])
    if unattributed:
        total.update({"cases": unattributed, "other": unattributed, "failed": unattributed})
        rows.append(["?", "missing (ids unknown)", unattributed, 0, 0, unattributed, unattributed, "0.0"])
    rows.append(["**all**" if md else "all", "", total["cases"], total["OK"], total["INFORMATIONAL"],
                 total["other"], total["failed"], f"{total['ms'] / 1000:.1f}"])
    print(table(["Group", "Category", "Cases", "OK", "INFORMATIONAL", "Other", "Failed", "Time (s)"],
                rows, md, "llrrrrrr"))
    print()

    # 3. each failed case
    if failed or unattributed:
        print("Failed cases (behavior / close behavior):")
        bullet = "- " if md else "  "
        for agent, cid, b, bc, _ in sorted(failed, key=lambda r: (r[0], case_key(r[1]))):
            if b == MISSING:
                continue
            who = f"{agent} " if len(agents) > 1 else ""
            print(f"{bullet}{who}{cid}: behavior={b} behaviorClose={bc}")
        missing = sorted((r[1] for r in failed if r[2] == MISSING), key=case_key)
        if missing:
            shown = ", ".join(missing[:MAX_MISSING_LISTED])
            more = f" ... and {len(missing) - MAX_MISSING_LISTED} more" if len(missing) > MAX_MISSING_LISTED else ""
            print(f"{bullet}{len(missing)} case(s) with no result (MISSING: connection refused, "
                  f"server died or hung): {shown}{more}")
        if unattributed:
            print(f"{bullet}{unattributed} announced case(s) with no result "
                  "(connection refused, server died or hung)")
        print()

    if not results and not unattributed:
        print("summarize: index.json holds no results: nothing was tested", file=sys.stderr)
    # 4. the closing line
    print(f"autobahn: {len(passed)} passed, {n_failed} failed")
    return 0 if passed and n_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
