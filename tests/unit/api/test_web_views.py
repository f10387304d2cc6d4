"""The pages' pure parts: the chart's filled hours, the sessions form and pager, where commands sit in casts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from sandtrap.api.web import detail as view
from sandtrap.api.web.listing import DEFAULT_PAGE_SIZE, Pager, parse_query, parse_sensor, parse_since, sensor_param
from sandtrap.api.web.timeline import Bucket, chart, fill_hours, floor_hour, window
from sandtrap.storage.records import CastInfo, CommandInfo, HourCount, SessionDetail

NOW = datetime(2026, 3, 4, 15, 42, 7, tzinfo=UTC)
H = timedelta(hours=1)


def hc(hour: datetime, count: int) -> HourCount:
    return HourCount(hour=hour, count=count)


# -- timeline -------------------------------------------------------------------------------------------
def test_fill_hours_fills_every_empty_hour_with_zero() -> None:
    end = floor_hour(NOW)
    start = end - 5 * H
    buckets = fill_hours([hc(start + H, 3), hc(end, 2)], start, end)
    assert [(b.start, b.count) for b in buckets] == [
        (start, 0),
        (start + H, 3),
        (start + 2 * H, 0),
        (start + 3 * H, 0),
        (start + 4 * H, 0),
        (end, 2),
    ]


def test_fill_hours_drops_counts_outside_and_sums_wider_buckets() -> None:
    start = datetime(2026, 3, 4, 0, tzinfo=UTC)
    end = start + 11 * H
    counts = [hc(start - H, 99), hc(start, 1), hc(start + 5 * H, 2), hc(start + 6 * H, 4), hc(end + H, 99)]
    buckets = fill_hours(counts, start, end, hours_per_bucket=6)
    assert [(b.start, b.hours, b.count) for b in buckets] == [(start, 6, 3), (start + 6 * H, 6, 4)]


def test_fill_hours_of_an_empty_window() -> None:
    assert fill_hours([], NOW, NOW - H) == []
    assert [b.count for b in fill_hours([], NOW - 2 * H, NOW)] == [0, 0, 0]


@pytest.mark.parametrize(("name", "bars", "step"), [("24h", 24, 1), ("7d", 168, 1), ("30d", 121, 6)])
def test_window_ends_at_the_current_hour(name: str, bars: int, step: int) -> None:
    start, end, hours = window(name, [], NOW)
    assert end == floor_hour(NOW) and hours == step
    assert start.minute == 0 and start.hour % step == 0
    assert len(fill_hours([], start, end, hours)) == bars


def test_window_all_starts_at_the_first_day_with_sessions_and_stays_small() -> None:
    first = NOW - timedelta(days=900)
    start, end, step = window("all", [hc(floor_hour(first), 1), hc(floor_hour(NOW), 1)], NOW)
    assert start <= first and start.hour == 0 and end == floor_hour(NOW)
    assert len(fill_hours([], start, end, step)) <= 400


def test_window_unknown_range_is_seven_days() -> None:
    assert window("forever", [], NOW) == window("7d", [], NOW)


def test_chart_scales_bars_to_the_busiest_bucket() -> None:
    t = floor_hour(NOW)
    c = chart([Bucket(t, 1, 0), Bucket(t + H, 1, 10), Bucket(t + 2 * H, 1, 1)], width=300, height=120)
    assert c.max_count == 10 and c.total == 11
    heights = [b.height for b in c.bars]
    assert heights[0] == 0 and heights[1] == 100 and 1.5 <= heights[2] < 100
    assert all(b.y + b.height == 100 for b in c.bars)
    assert [b.x for b in c.bars] == [0, 100, 200]


def test_chart_labels_midnights_for_several_days_of_hours() -> None:
    start = datetime(2026, 3, 1, 0, tzinfo=UTC)
    c = chart(fill_hours([], start, start + 71 * H))
    assert [t.text for t in c.ticks] == ["03-01", "03-02", "03-03"]
    assert chart([]).bars == [] and chart([]).ticks == []


def test_bucket_label() -> None:
    t = datetime(2026, 3, 4, 5, tzinfo=UTC)
    assert Bucket(t, 1, 3).label == "2026-03-04 05:00–06:00 UTC: 3 sessions"
    assert Bucket(t, 24, 3).label == "2026-03-04 UTC: 3 sessions"


# -- the sessions form ------------------------------------------------------------------------------------
def test_parse_query_turns_the_form_into_filters() -> None:
    q = parse_query(
        {"src_ip": " 203.0.113.7 ", "username": "root", "command": "wget", "has_artifacts": "yes", "since": "24h",
         "service": "telnet"},
        NOW,
    )  # fmt: skip
    assert q.errors == []
    assert q.filters == {
        "sensor": None,
        "src_ip": "203.0.113.7",
        "service": "telnet",
        "username": "root",
        "command": "wget",
        "has_artifacts": True,
        "since": NOW - timedelta(hours=24),
    }
    assert (q.sort, q.page, q.per_page, q.offset) == ("-started_at", 1, DEFAULT_PAGE_SIZE, 0)
    assert q.is_filtered


def test_parse_sensor_is_an_exact_name_or_every_sensor() -> None:
    assert parse_sensor("") == (None, "") and parse_sensor("   ") == (None, "")
    assert parse_sensor(" honeypot-eu-1 ") == ("honeypot-eu-1", "")
    assert parse_sensor("a\x00b") == ("a\ufffdb", "")  # as stored: NUL is U+FFFD
    name, error = parse_sensor("x" * 257)
    assert name is None and error.startswith("sensor: longer than 256")
    assert sensor_param(None) == "" and sensor_param("eu 1&x") == "&sensor=eu+1%26x"
    q = parse_query({"sensor": " eu-1 ", "src_ip": "203.0.113.7"}, NOW)
    assert q.filters["sensor"] == "eu-1" and q.is_filtered
    assert q.url(page=2) == "/sessions?sensor=eu-1&src_ip=203.0.113.7&page=2"
    q = parse_query({"sensor": "x" * 300}, NOW)
    assert q.filters["sensor"] is None and q.form["sensor"] == "" and q.errors


def test_parse_query_empty_means_no_filters() -> None:
    q = parse_query({}, NOW)
    assert not q.is_filtered and q.errors == [] and q.url() == "/sessions"
    assert parse_query({"has_artifacts": "no"}, NOW).filters["has_artifacts"] is False


def test_parse_query_reports_bad_values_and_keeps_the_rest() -> None:
    q = parse_query(
        {"since": "yesterday-ish", "sort": "; drop table", "page": "-3", "per_page": "7", "src_ip": "x"}, NOW
    )
    assert len(q.errors) == 2 and "since" in q.errors[0] and "sort" in q.errors[1]
    assert q.filters["since"] is None and q.filters["src_ip"] == "x"
    assert (q.sort, q.page, q.per_page) == ("-started_at", 1, DEFAULT_PAGE_SIZE)
    assert parse_query({"page": "abc"}, NOW).page == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2w", NOW - timedelta(weeks=2)),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-03-01T12:30", datetime(2026, 3, 1, 12, 30, tzinfo=UTC)),
        ("2026-03-01 12:30", datetime(2026, 3, 1, 12, 30, tzinfo=UTC)),
        ("2026-03-01T12:30+02:00", datetime(2026, 3, 1, 10, 30, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


def test_url_keeps_the_filters_and_changes_the_page() -> None:
    q = parse_query({"command": "a&b=<c>", "src_ip": "1.2.3.4", "sort": "src_ip", "per_page": "100"}, NOW)
    url = q.url(page=3)
    parts = urlsplit(url)
    assert parts.path == "/sessions"
    assert parse_qs(parts.query) == {
        "command": ["a&b=<c>"],
        "src_ip": ["1.2.3.4"],
        "sort": ["src_ip"],
        "per_page": ["100"],
        "page": ["3"],
    }
    assert "page" not in parse_qs(urlsplit(q.url(page=1)).query)


def test_pager() -> None:
    p = Pager(total=1234, page=7, per_page=50)
    assert (p.pages, p.first_item, p.last_item, p.has_prev, p.has_next) == (25, 301, 350, True, True)
    assert p.window() == [1, None, 5, 6, 7, 8, 9, None, 25]
    assert Pager(0, 1, 50).window() == [1] and Pager(0, 1, 50).first_item == 0
    last = Pager(101, 3, 50)
    assert (last.first_item, last.last_item, last.has_next) == (101, 101, False)


# -- the session page ---------------------------------------------------------------------------------------
T0 = datetime(2026, 3, 4, 5, 0, tzinfo=UTC)


def session(commands: list[CommandInfo], casts: list[CastInfo]) -> SessionDetail:
    return SessionDetail(
        id="abc",
        sensor="s",
        protocol="ssh",
        src_ip="203.0.113.7",
        src_port=1,
        dst_ip="192.0.2.1",
        dst_port=22,
        started_at=T0,
        ended_at=None,
        duration_ms=None,
        close_reason=None,
        client_version=None,
        hassh=None,
        hassh_algorithms=None,
        key_type=None,
        key_fingerprint=None,
        username="root",
        login_success=True,
        auth_attempts_count=1,
        commands_count=len(commands),
        artifacts_count=0,
        sandbox_id=None,
        sandbox_name=None,
        bytes_in=0,
        bytes_out=0,
        auth_attempts=[],
        commands=commands,
        artifacts=[],
        casts=casts,
        sandbox=None,
    )


def cmd(seconds: float, channel: int | None) -> CommandInfo:
    return CommandInfo(
        session="abc", timestamp=T0 + timedelta(seconds=seconds), channel=channel, input="ls", source="tty"
    )


def cast(channel: int | None, opened_s: float | None, path: str = "casts/abc/0.cast") -> CastInfo:
    opened = None if opened_s is None else T0 + timedelta(seconds=opened_s)
    return CastInfo(session="abc", channel=channel, path=path, size=1, sha256=None, opened_at=opened, closed_at=None)


def test_commands_are_placed_in_their_channels_cast() -> None:
    d = session(
        [cmd(3.25, 0), cmd(10.5, 1), cmd(9.9, 1), cmd(4, 7)],
        [cast(0, 2.0), cast(1, 10.0, "casts/abc/1.cast")],
    )
    recs = view.recordings(d)
    assert [(r.index, r.channel, r.url) for r in recs] == [
        (0, 0, "/api/v1/sessions/abc/cast"),
        (1, 1, "/api/v1/sessions/abc/cast?channel=1"),
    ]
    placed = view.place_commands(d, recs)
    # 1.25 s into channel 0's cast; 0.5 s into channel 1's; an exec command just before its cast opens: 0;
    # a channel without a cast: no place.
    assert [(p.recording, p.offset_s) for p in placed] == [(0, 1.25), (1, 0.5), (1, 0.0), (None, None)]


def test_a_cast_without_an_open_time_counts_from_the_session_start() -> None:
    d = session([cmd(4.5, 0)], [cast(0, None)])
    (p,) = view.place_commands(d, view.recordings(d))
    assert (p.recording, p.offset_s) == (0, 4.5)


def test_no_casts_no_places() -> None:
    d = session([cmd(1, 0), cmd(2, None)], [cast(0, 0.0, path="")])
    assert view.recordings(d) == []
    assert [(p.recording, p.offset_s) for p in view.place_commands(d, [])] == [(None, None), (None, None)]


def test_ids_and_hashes_in_urls() -> None:
    assert view.session_path("a/b?c") == "/sessions/a%2Fb%3Fc"
    assert view.api_session_path("x y") == "/api/v1/sessions/x%20y"
    assert view.artifact_url("ab" * 32) == "/api/v1/artifacts/" + "ab" * 32
    for bad in (None, "", "AB" * 32, "ab" * 31, "../../etc/passwd", '"><script>'):
        assert view.artifact_url(bad) is None


def test_format_offset() -> None:
    assert view.format_offset(None) == ""
    assert view.format_offset(0) == "0:00.0"
    assert view.format_offset(75.25) == "1:15.2"
    assert view.format_offset(3725.0) == "1:02:05.0"
