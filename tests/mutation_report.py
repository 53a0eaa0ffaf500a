"""Kill rate per module from mutmut's results, and the survivors with their diffs (``make mutation``).

Reads ``mutmut results --all true``; writes benchmarks/results/mutation.md (or the path given). A mutant counts as killed when
a test failed; timeouts are listed apart and not counted (on a loaded machine they are often the load, not
the mutant: rerun them with ``mutmut run NAME``). "no tests" mutants (code no selected test runs) count against the rate. Survivors
listed in tests/mutation_equivalent.txt (``mutant-name  reason``) are equivalent mutants: reported with their
reason and left out of the adjusted rate. A module without results in ``mutants/`` (which is not committed:
a fresh clone, or a run of other modules) keeps its row and survivors from the report file being rewritten,
marked as an earlier run; modules that no run has covered are listed as not run.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]
KILLED = {"killed", "caught by type check"}


def results() -> dict[str, str]:
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+?)\s*$", out, re.M))


def diff(name: str) -> str:
    out = subprocess.run([*MUTMUT, "show", name], cwd=ROOT, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if line[:2] in ("- ", "+ "))


def equivalents() -> dict[str, str]:
    path = ROOT / "tests" / "mutation_equivalent.txt"
    if not path.exists():
        return {}
    pairs = (line.split(None, 1) for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    return {name: reason.strip() for name, reason in pairs}


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def earlier_report(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """{module: its table row} and {module: its survivor sections} of an earlier report at ``path``."""
    if not path.exists():
        return {}, {}
    rows, sections, current = {}, collections.defaultdict(list), None
    for line in path.read_text().splitlines():
        row = re.match(r"^\| ([a-z0-9_.]+)( \(earlier run\))? \| (?!not run)", line)
        if row:
            rows[row[1]] = line if row[2] else line.replace(f"| {row[1]} |", f"| {row[1]} (earlier run) |", 1)
            continue
        head = re.match(r"^#### `(\S+__mutmut_\d+)`", line)
        if head:
            current = module_of(head[1])
        if current is not None:
            sections[current].append(line)
    return rows, sections


def main(out_path: str = "benchmarks/results/mutation.md") -> int:
    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    modules = [p.removesuffix(".py").replace("/", ".") for p in configured]
    status, equiv = results(), equivalents()
    kept_rows, kept_sections = earlier_report(ROOT / out_path)
    by_module = collections.defaultdict(collections.Counter)
    survivors = collections.defaultdict(list)
    for name, st in status.items():
        mod = module_of(name)
        by_module[mod][st] += 1
        if st not in KILLED:
            survivors[mod].append((name, st))

    rows, lines = [], []
    for path, mod in zip(configured, modules):
        counts = by_module.get(mod)
        meta = ROOT / "mutants" / f"{path}.meta"
        if not counts and meta.exists() and not json.loads(meta.read_text()).get("exit_code_by_key"):
            rows.append(f"| {mod} | none: every function is decorated (not mutated by mutmut 3) | | | | | | | |")
            continue
        if not counts or counts.get("not checked", 0) == sum(counts.values()):
            if mod in kept_rows:
                rows.append(kept_rows[mod])
                lines += kept_sections.get(mod, [])
                print(f"{mod:40s} kept from the earlier report")
            else:
                rows.append(f"| {mod} | not run | | | | | | | |")
            continue
        total = sum(counts.values()) - counts.get("not checked", 0)
        killed = sum(counts[s] for s in KILLED)
        n_equiv = sum(1 for name, st in survivors[mod] if st == "survived" and name in equiv)
        rate = 100 * killed / total
        adjusted = 100 * killed / max(total - n_equiv, 1)
        not_run = counts.get("not checked", 0)
        rows.append(f"| {mod} | {total} | {killed} | {counts['survived']} | {n_equiv} | {counts['timeout']} | "
                    f"{counts['no tests']} | {rate:.1f}% ({adjusted:.1f}%) | {not_run or ''} |")
        unchecked = f", {not_run} not run yet" if not_run else ""
        print(f"{mod:40s} {killed:4d}/{total:<4d} killed  {rate:5.1f}%  ({adjusted:.1f}% without equivalents){unchecked}")
        for name, st in survivors[mod]:
            if st in ("timeout", "not checked"):
                continue
            tag = f"equivalent: {equiv[name]}" if name in equiv else st
            lines += [f"#### `{name}` ({tag})", "", "```diff", diff(name), "```", ""]

    doc = ["# Mutation testing", "",
           "Generated by `make mutation` (mutmut; `tests/mutation_report.py`). Each mutant is one small change to",
           "one function of the maths modules; only the tests that ran that function run against it. Functions",
           "with decorators other than staticmethod/classmethod (e.g. `@torch.no_grad()` samplers, Triton kernels)",
           "are not mutated by mutmut 3.", "",
           "A module with mutants \"not run\" was run on a deterministic sample (in each function, the mutants whose",
           "number is 1 modulo k) or on the functions listed in docs/mutation.md: its rate is that sample's.",
           "A module marked \"earlier run\" had no results in this run's `mutants/` (not committed): its row and",
           "survivors are those of the report this one replaced.", "",
           "| module | mutants run | killed | survived | of which equivalent | timeout | no tests "
           "| kill rate (without equivalents) | not run |",
           "|---|---|---|---|---|---|---|---|---|",
           *rows,
           "", "## Survivors and uncovered mutants", "", *lines]
    Path(ROOT / out_path).write_text("\n".join(doc) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
