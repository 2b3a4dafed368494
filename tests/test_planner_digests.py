"""Same inputs, same plans: every case of ``benchmarks/planner_digests.py`` plans to the digest recorded in
``tests/data/planner_digests.json`` (recorded before the planner took ``PlannerOptions``, re-recorded when
small rounds became exact and when rounds of up to 12 samples were searched exactly)."""

from __future__ import annotations

import json

from benchmarks.planner_digests import DATA_PREFIX, RECORD, digests
from tests.helpers import shared_data_available


def test_every_recorded_case_plans_to_its_recorded_digest():
    recorded = json.loads(RECORD.read_text())
    with_data = shared_data_available()
    current = digests(with_data)
    expected = {case: digest for case, digest in recorded.items() if with_data or not case.startswith(DATA_PREFIX)}
    assert len(expected) >= 90 and set(current) == set(expected)
    changed = sorted(case for case in expected if current[case] != expected[case])
    assert not changed, f"{len(changed)} of {len(expected)} plans changed, e.g. {changed[:10]}"
