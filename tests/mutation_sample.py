"""A deterministic sample of a module's mutants, for modules too large to run in full on 2 cores.

    python tests/mutation_sample.py core.timesteps=3 plugins.gmm=8 > names.txt
    make mutation MUTANTS="$(cat names.txt)"

In every function of the module, keeps the mutants whose number is 1 modulo k (k=1: all), so each function is
sampled at the same rate and mutant 1 of each is in. Only mutants without a result are listed. Reads the mutant
lists in mutants/ (written by any earlier ``mutmut run``) and prints, on stderr, the sample's size and its
worst-case time (every mutant surviving) from the test durations of mutmut's coverage pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def sample(module: str, k: int) -> list[str]:
    meta = json.loads((MUTANTS / (module.replace(".", "/") + ".py.meta")).read_text())["exit_code_by_key"]
    return [m for m, code in meta.items() if code is None and int(m.rsplit("_", 1)[1]) % k == 1 % k]


def main(specs: list[str]) -> int:
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())
    tests, seconds = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    for spec in specs:
        module, _, k = spec.partition("=")
        names = sample(module, int(k or 1))
        worst = sum(sum(seconds.get(t, 0.0) for t in tests.get(function_of(m), ())) for m in names)
        print(f"{module}: {len(names)} mutants, at most {worst / 60:.0f} min", file=sys.stderr)
        print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
