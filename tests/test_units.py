"""Unit-bearing arguments: sizes, rates and durations."""

import pytest

from mig.units import format_size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("64KiB", 65536),
        ("1GiB", 1 << 30),
        ("1.5GB", 1_500_000_000),
        ("2m", 2 << 20),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100MiB/s", 100 << 20),
        ("1Gbit/s", 125_000_000),
        ("10Gbps", 1_250_000_000),
        ("0", 0),
        ("512KB/s", 512_000),
    ],
)
def test_rates(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("300ms", 0.3), ("2s", 2.0), ("1.5min", 90.0), ("250us", 250e-6)]
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


def test_bare_duration_uses_default_unit() -> None:
    assert parse_duration("300", default_unit="ms") == pytest.approx(0.3)


@pytest.mark.parametrize("bad", ["", "abc", "1XiB", "-5MiB", "1.2.3"])
def test_bad_sizes_quote_the_input(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)


def test_bad_rate_and_duration() -> None:
    with pytest.raises(ValueError, match="unknown unit 'furlongs'"):
        parse_rate("3furlongs")
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")


def test_format_size() -> None:
    assert format_size(1 << 30) == "1.0 GiB"
    assert format_size(512) == "512 B"
