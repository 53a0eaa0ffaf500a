"""Refactors keep training bit-identical: fixed-seed short runs of every method (tests/bitident.py) end with
exactly the weights and optimizer state recorded in tests/data/bitident.json (by the code before the change,
on this CPU: x86-64, one intra-op thread). Regenerate with ``python tests/bitident.py --write`` only when a
change is meant to alter training."""

import json
import platform

import pytest

import bitident


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checksums were recorded on x86-64")
def test_short_runs_are_bit_identical_to_the_recorded_checksums(tmp_path):
    expected = json.loads(bitident.CHECKSUMS.read_text())
    got = bitident.all_digests(str(tmp_path))
    assert set(got) == set(expected)
    changed = {f"{run}/{f}" for run in expected for f in expected[run] if got[run].get(f) != expected[run][f]}
    assert not changed, f"weights changed: {sorted(changed)}"
