"""The incremental ``text/event-stream`` parser (worker/sse.py)."""

from __future__ import annotations

import pytest

from worker.sse import SseFrame, SseFrameTooLarge, SseParser


def feed_all(parser: SseParser, *chunks: bytes) -> list[SseFrame]:
    frames: list[SseFrame] = []
    for chunk in chunks:
        frames.extend(parser.feed(chunk))
    return frames


def parse(*chunks: bytes, max_frame_bytes: int = 4 * 1024 * 1024) -> list[SseFrame]:
    return feed_all(SseParser(max_frame_bytes), *chunks)


REAL_STREAM = (
    b"id: 1795534212038-0\n"
    b"event: pydantic_ai_event\n"
    b'data: {"id":"1795534212038-0","type":"pydantic_ai_event","agent_message_delta":"[turn"}\n'
    b"\n"
    b": keepalive\n"
    b"\n"
    b"id: 1795534212058-0\n"
    b"event: pydantic_ai_event\n"
    b'data: {"id":"1795534212058-0",'
    b'"agent_message_delta":" 1] \xc3\xa9t\xc3\xa9 \xf0\x9f\x99\x82"}\n'
    b"\n"
    b"id: 1795534212144-0\n"
    b"event: run_succeeded\n"
    b'data: {"id":"1795534212144-0","type":"run_succeeded"}\n'
    b"\n"
)

REAL_FRAMES = [
    SseFrame("1795534212038-0", "pydantic_ai_event",
             '{"id":"1795534212038-0","type":"pydantic_ai_event","agent_message_delta":"[turn"}'),
    SseFrame("1795534212058-0", "pydantic_ai_event",
             '{"id":"1795534212058-0","agent_message_delta":" 1] été 🙂"}'),
    SseFrame("1795534212144-0", "run_succeeded",
             '{"id":"1795534212144-0","type":"run_succeeded"}'),
]


def test_frame_carries_id_event_and_data() -> None:
    assert parse(b"id: 1-0\nevent: run_started\ndata: {}\n\n") == [
        SseFrame("1-0", "run_started", "{}")]


def test_frame_without_id_or_event_has_none_for_them() -> None:
    assert parse(b"data: hello\n\n") == [SseFrame(None, None, "hello")]


def test_real_stream_parses_into_its_frames() -> None:
    assert parse(REAL_STREAM) == REAL_FRAMES


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert parse(b"data: first\ndata: second\ndata:\ndata: fourth\n\n") == [
        SseFrame(None, None, "first\nsecond\n\nfourth")]


def test_comment_lines_yield_nothing() -> None:
    parser = SseParser()

    assert feed_all(parser, b": keepalive\n\n", b":\n\n", b": another\n\n") == []
    assert parser.mid_frame is False


def test_comment_inside_a_frame_is_ignored() -> None:
    assert parse(b"data: a\n: keepalive\ndata: b\n\n") == [SseFrame(None, None, "a\nb")]


def test_frame_is_only_dispatched_on_a_blank_line() -> None:
    parser = SseParser()

    assert feed_all(parser, b"id: 1-0\nevent: run_started\ndata: {}\n") == []
    assert feed_all(parser, b"\n") == [SseFrame("1-0", "run_started", "{}")]


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"], ids=["CRLF", "LF", "CR"])
def test_every_line_ending_is_understood(newline: bytes) -> None:
    stream = newline.join([b"id: 7-0", b"event: e", b"data: a", b"data: b", b"", b""])

    assert parse(stream) == [SseFrame("7-0", "e", "a\nb")]


def test_mixed_line_endings_in_one_stream() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"

    assert parse(stream) == [SseFrame(None, None, "a\nb\nc"), SseFrame(None, None, "d")]


def test_crlf_split_across_two_feeds_is_one_line_end() -> None:
    # Were the LF at the start of the second chunk taken as a line end of its own, it would be a
    # blank line and dispatch "a" alone.
    parser = SseParser()

    frames = feed_all(parser, b"data: a\r", b"\ndata: b\r\n\r\n")

    assert frames == [SseFrame(None, None, "a\nb")]


def test_crlf_blank_line_split_across_feeds_dispatches_exactly_one_frame() -> None:
    parser = SseParser()

    frames = feed_all(parser, b"data: a\r\n\r", b"\ndata: b\r\n\r\n")

    assert frames == [SseFrame(None, None, "a"), SseFrame(None, None, "b")]


def test_empty_chunk_between_a_split_crlf_does_not_break_it() -> None:
    parser = SseParser()

    frames = feed_all(parser, b"data: a\r", b"", b"\ndata: b\r\n\r\n")

    assert frames == [SseFrame(None, None, "a\nb")]


def test_lone_cr_at_chunk_end_followed_by_a_field_is_a_line_end() -> None:
    assert parse(b"data: a\r", b"data: b\r\r") == [SseFrame(None, None, "a\nb")]


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"], ids=["CRLF", "LF", "CR"])
def test_stream_fed_byte_by_byte_gives_the_same_frames_as_fed_whole(newline: bytes) -> None:
    stream = REAL_STREAM.replace(b"\n", newline)
    whole = parse(stream)

    one_byte_at_a_time = parse(*(stream[i:i + 1] for i in range(len(stream))))

    assert whole == REAL_FRAMES
    assert one_byte_at_a_time == whole


@pytest.mark.parametrize("size", [2, 3, 7, 64])
def test_stream_fed_in_odd_chunks_gives_the_same_frames(size: int) -> None:
    stream = REAL_STREAM.replace(b"\n", b"\r\n")

    assert parse(*(stream[i:i + size] for i in range(0, len(stream), size))) == REAL_FRAMES


@pytest.mark.parametrize("line", [b"data:x", b"data: x", b"data:  x"])
def test_one_leading_space_after_the_colon_is_dropped(line: bytes) -> None:
    expected = line.split(b":", 1)[1].removeprefix(b" ").decode()

    assert parse(line + b"\n\n") == [SseFrame(None, None, expected)]


def test_fields_without_a_space_after_the_colon() -> None:
    assert parse(b"id:3-0\nevent:run_started\ndata:{}\n\n") == [
        SseFrame("3-0", "run_started", "{}")]


def test_colon_inside_the_value_is_kept() -> None:
    assert parse(b'data: {"a": "b:c"}\n\n') == [SseFrame(None, None, '{"a": "b:c"}')]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"retry: 1000\nfoo: bar\ndata: x\n\n") == [SseFrame(None, None, "x")]


def test_id_persists_to_later_frames_without_an_id_line() -> None:
    frames = parse(b"id: 1-0\ndata: a\n\n", b"data: b\n\n", b"id: 2-0\ndata: c\n\n",
                   b"event: e\ndata: d\n\n")

    assert [frame.event_id for frame in frames] == ["1-0", "1-0", "2-0", "2-0"]


def test_event_type_does_not_persist_to_the_next_frame() -> None:
    frames = parse(b"event: run_started\ndata: a\n\ndata: b\n\n")

    assert [frame.event for frame in frames] == ["run_started", None]


def test_id_with_a_nul_character_is_ignored() -> None:
    frames = parse(b"id: 1-0\ndata: a\n\nid: 2\x00-0\ndata: b\n\n")

    assert [frame.event_id for frame in frames] == ["1-0", "1-0"]


def test_blank_lines_without_fields_dispatch_nothing() -> None:
    assert parse(b"\n\n\r\n\r\r") == []


def test_single_line_longer_than_the_limit_raises() -> None:
    parser = SseParser(max_frame_bytes=64)

    with pytest.raises(SseFrameTooLarge, match="exceeds 64 bytes"):
        list(parser.feed(b"data: " + b"x" * 100))


def test_long_line_growing_over_several_feeds_raises() -> None:
    parser = SseParser(max_frame_bytes=64)
    list(parser.feed(b"data: " + b"x" * 40))

    with pytest.raises(SseFrameTooLarge):
        list(parser.feed(b"x" * 40))


def test_many_data_lines_adding_up_past_the_limit_raise() -> None:
    parser = SseParser(max_frame_bytes=64)

    with pytest.raises(SseFrameTooLarge, match="exceeds 64 bytes"):
        list(parser.feed(b"data: 0123456789\n" * 10))


def test_many_data_lines_over_several_feeds_raise() -> None:
    parser = SseParser(max_frame_bytes=64)

    with pytest.raises(SseFrameTooLarge):
        for _ in range(10):
            list(parser.feed(b"data: 0123456789\n"))


def test_frames_each_under_the_limit_do_not_add_up() -> None:
    parser = SseParser(max_frame_bytes=64)

    frames = feed_all(parser, *([b"data: 0123456789\n\n"] * 20))

    assert frames == [SseFrame(None, None, "0123456789")] * 20


def test_mid_frame_after_a_partial_frame() -> None:
    parser = SseParser()

    list(parser.feed(b"id: 1-0\ndata: partial\n"))

    assert parser.mid_frame is True


def test_mid_frame_after_a_partial_line() -> None:
    parser = SseParser()

    list(parser.feed(b"data: unfinish"))

    assert parser.mid_frame is True


def test_not_mid_frame_after_a_complete_frame() -> None:
    parser = SseParser()

    assert feed_all(parser, b"id: 1-0\ndata: x\n\n") == [SseFrame("1-0", None, "x")]
    assert parser.mid_frame is False


def test_not_mid_frame_before_anything_is_fed() -> None:
    assert SseParser().mid_frame is False


def test_not_mid_frame_after_a_keepalive_comment() -> None:
    parser = SseParser()

    list(parser.feed(b": keepalive\n"))

    assert parser.mid_frame is False
