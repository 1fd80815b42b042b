"""``sandkernel doctor --attack``: the quick subset runs on this machine and every attack holds."""

from __future__ import annotations

import json

import pytest

from sandkernel._attacks import ATTACKS, AttackOutcome, print_attacks
from sandkernel.cli import build_parser
from sandkernel.doctor import run_doctor


def test_the_attack_option_parses() -> None:
    parser = build_parser()
    assert parser.parse_args(["doctor", "--attack"]).attack is True
    assert parser.parse_args(["doctor"]).attack is False


def test_the_report_names_what_did_not_hold(capsys: pytest.CaptureFixture[str]) -> None:
    print_attacks([AttackOutcome("a", True, "EPERM"), AttackOutcome("b", False, "allowed: x")])
    out = capsys.readouterr().out
    assert "[held] a" in out and "[NOT HELD] b" in out
    assert out.rstrip().endswith("2 attacks tried, 1 held")


@pytest.mark.sandbox
def test_doctor_with_attack_runs_the_subset_and_every_attack_holds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = run_doctor(as_json=True, attack=True)
    report = json.loads(capsys.readouterr().out)
    assert report["tried"] == len(ATTACKS) >= 10
    assert report["held"] == report["tried"], [a for a in report["attacks"] if not a["held"]]
    assert code == 0 and report["ok"]
