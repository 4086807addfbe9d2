"""The fuzz program's generators (benchmarks/fuzz_parsers.py) as hypothesis strategies, with a small budget: every
parser either refuses an input cleanly, naming the file, or accepts one that is valid; none raises anything else.

Both VFL decoders are checked: the channel's receiver and `parse_frames`, the decoder for tests and tools.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_parsers import KINDS, VALID, generate, run_case


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), rng=st.randoms(use_true_random=False))
def test_every_parser_refuses_cleanly_or_accepts_only_valid_input(kind: str, rng: random.Random) -> None:
    case = generate(kind, rng)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_case(case, Path(tmp))
    assert outcome.status in ("refused", "accepted"), f"{kind} [{case.mutation}]: {outcome.detail}"
    assert not outcome.nonsense, f"{kind} accepted an invalid input [{case.mutation}]: {outcome.detail}"
    assert not outcome.unnamed, f"{kind} refused without naming the file [{case.mutation}]: {outcome.detail}"
    assert not (outcome.status == "refused" and case.expect == VALID), f"{kind} refused a valid input: {outcome.detail}"


def test_the_generators_make_valid_and_invalid_inputs_for_every_parser() -> None:
    # The property above means little if a generator only ever made refusals (or only valid inputs).
    rng = random.Random(0)
    for kind in KINDS:
        expects = {generate(kind, rng).expect for _ in range(60)}
        assert {"valid", "invalid"} <= expects, f"{kind} made only {expects}"
