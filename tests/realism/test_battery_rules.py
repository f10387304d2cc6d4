"""The battery's bookkeeping (pure logic, no engine): what sandtrap must show on a given host."""

from __future__ import annotations

from dataclasses import replace

from battery import CHECKS, Context, Result, counts, engine_nofile_hard, expected_here, markdown, outcome

NOFILE = next(c for c in CHECKS if c.id == "nofile-hard-limit")


def _result(out: str) -> Result:
    return Result(out, "", 0, Context())


def test_host_limit_is_expected_to_pass_where_the_host_allows() -> None:
    allowing = replace(NOFILE, host_allows=lambda: True)
    refusing = replace(NOFILE, host_allows=lambda: False)
    assert expected_here(allowing, "fail") == "pass"
    assert expected_here(refusing, "fail") == "host-limit"
    # A host-limit check is not excused by the plain container passing or failing: only the host counts.
    assert expected_here(refusing, "pass") == "host-limit"


def test_nofile_rule_wants_systemds_session_limits() -> None:
    assert outcome(NOFILE, _result("1024\n524288\n")) == "pass"
    assert outcome(NOFILE, _result("1024\n16384\n")) == "fail"
    assert outcome(NOFILE, _result("1048576\n1048576\n")) == "fail"
    assert outcome(NOFILE, _result("bash: ulimit: command not found\n")) == "fail"


def test_nofile_expectation_follows_the_engines_limit() -> None:
    engine = engine_nofile_hard()
    assert engine >= 0
    assert expected_here(NOFILE, "fail") == ("pass" if engine >= 524288 else "host-limit")


def test_counts_and_markdown_list_host_limits_apart() -> None:
    refusing = replace(NOFILE, host_allows=lambda: False)
    rows = [(refusing, "fail", "fail")]
    c = counts(rows)  # type: ignore[arg-type]
    assert (c["host-limit"], c["known-gap"], c["regressions"]) == (1, 0, 0)
    text = markdown(rows)  # type: ignore[arg-type]
    assert "limits of the test host 1." in text
    assert "### Limits of the test host" in text and "### Known gaps" not in text
    allowing = replace(NOFILE, host_allows=lambda: True)
    assert counts([(allowing, "fail", "fail")])["regressions"] == 1  # type: ignore[list-item]
