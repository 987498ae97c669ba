"""Which fault stream the push follows, in virtual time
(``mig.sim_fault_streams``, the twin of ``fault_streams.rs``, whose own
tests these mirror)."""

from __future__ import annotations

import pytest

from mig.sim_fault_streams import READ_AHEAD, STREAM_LIVE, TRAILS, Answer, FaultStreams

MS = 1e-3
CHUNK, ALONE = Answer.CHUNK, Answer.PAGE_ALONE


class Thread:
    """The request thread's use of ``FaultStreams``: a chunk's read-ahead
    sends the next ``READ_AHEAD``, the cursor goes after them."""

    def __init__(self, cursor: int = 0) -> None:
        self.streams = FaultStreams()
        self.cursor = cursor

    def request(self, c: int, now: float) -> Answer:
        a = self.streams.answer(c, self.cursor, now)
        if a is CHUNK:
            self.cursor = c + 1 + READ_AHEAD
            self.streams.took_cursor(c, self.cursor, now)
        return a


def two_walks(a: int, b: int) -> list[list[Answer]]:
    """Two vCPUs walking from chunks ``a`` and ``b`` in turn, after a
    scattered request long quiet; the answers to each."""
    thread = Thread(4000)
    thread.request(4000, 0.0)
    answers: list[list[Answer]] = [[], []]
    nxt = [a, b]
    for i in range(6):
        for who in (0, 1):
            x = thread.request(nxt[who], (20 + i) * MS)
            # Past the read-ahead, or the next chunk after a page alone.
            nxt[who] += 1 + READ_AHEAD if x is CHUNK else 1
            answers[who].append(x)
    return answers


@pytest.mark.parametrize(("a", "b"), [(0, 1000), (1000, 0)])
def test_one_of_two_walks_is_followed_whichever_faults_first(a: int, b: int) -> None:
    first, second = two_walks(a, b)
    assert first == [CHUNK] * 6
    assert second == [CHUNK] + [ALONE] * 5


def test_the_first_request_of_the_phase_is_followed() -> None:
    thread = Thread()
    assert thread.request(1000, 0.0) is CHUNK
    assert thread.request(0, 1 * MS) is ALONE


def test_a_quiet_stream_lets_the_next_request_take_the_cursor() -> None:
    thread = Thread()
    assert thread.request(0, 0.0) is CHUNK
    assert thread.request(1000, 1 * MS) is ALONE
    # Quiet 10 ms after its hit: the walks take the cursor in turn, the
    # other walk continues its trail first and keeps it.
    assert thread.request(1001, STREAM_LIVE) is CHUNK
    assert thread.request(4, 11 * MS) is CHUNK
    assert thread.request(1005, 12 * MS) is CHUNK
    assert thread.request(8, 13 * MS) is ALONE


def test_scattered_faults_take_the_cursor_each() -> None:
    thread = Thread()
    assert thread.request(0, 0.0) is CHUNK
    for i, c in enumerate([300, 40, 900, 170, 620, 80, 450]):
        assert thread.request(c, (10 + i) * MS) is CHUNK, (i, c)
        assert thread.streams.followed is None, (i, c)


def test_trails_are_bounded_and_the_oldest_goes_first() -> None:
    s = FaultStreams()
    for i in range(TRAILS + 1):
        s.took_cursor(0, 100 * (i + 1), i * MS)
    left = [x for x, _ in s.trails]
    assert len(left) == TRAILS and 100 not in left
