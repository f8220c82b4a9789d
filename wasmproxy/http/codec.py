"""Sans-IO HTTP/1.1 codec on httptools (llhttp): ServerCodec for downstream, ClientCodec for upstream.

No sockets here, in the style of h11: `feed(bytes)` parses and reports events through a
callbacks object, and `encode_*` return the bytes to write. Framing, limits, error codes and
details follow Envoy's HTTP/1 codec (source/common/http/http1/codec_impl.cc):

* requests without a body deliver headers with end_stream=True; with a body, headers then
  data(..., False) chunks then data(b"", True) (or trailers when enabled), as Envoy does;
* the server parses one request at a time: once a request is complete, later pipelined
  requests wait until the response to it has been encoded and `resume()` is called;
* a bad request is reported once as a `CodecError` carrying Envoy's local-reply status and
  response-code details; nothing is parsed after it.

User callbacks never run inside httptools' own callbacks: parser callbacks only queue events,
which are delivered after `feed_data` returns, so a callback may pause, encode or raise freely.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Callable, Protocol

import httptools

from .headers import HeaderMap

__all__ = [
    "CodecError",
    "ServerCodec",
    "ServerCodecCallbacks",
    "ClientCodec",
    "ClientCodecCallbacks",
    "reason_phrase",
    "DEFAULT_MAX_HEADERS_KB",
    "DEFAULT_MAX_HEADERS_COUNT",
]

# Envoy's defaults: HttpConnectionManager.max_request_headers_kb and
# common_http_protocol_options.max_headers_count.
DEFAULT_MAX_HEADERS_KB = 60
DEFAULT_MAX_HEADERS_COUNT = 100

# Envoy's Http1ResponseCodeDetailValues and StreamInfo::ResponseCodeDetails used by the codec.
DETAILS_CODEC_ERROR = "http1.codec_error"
DETAILS_HEADERS_TOO_LARGE = "http1.headers_too_large"
DETAILS_TOO_MANY_HEADERS = "http1.too_many_headers"
DETAILS_INVALID_URL = "http1.invalid_url"
DETAILS_INVALID_TRANSFER_ENCODING = "http1.invalid_transfer_encoding"
DETAILS_INVALID_CHARACTERS = "http1.invalid_characters"
DETAILS_CONNECTION_HEADER_REJECTED = "http1.connection_header_rejected"
DETAILS_INVALID_AUTHORITY = "http.invalid_authority"
DETAILS_LOW_VERSION = "low_version"
DETAILS_UNEXPECTED_UNDERSCORE = "http1.unexpected_underscore"

# HttpProtocolOptions.HeadersWithUnderscoresAction
UNDERSCORES_ALLOW, UNDERSCORES_REJECT_REQUEST, UNDERSCORES_DROP_HEADER = 0, 1, 2

# CodeUtility::toString (source/common/http/codes.cc); anything else prints "Unknown".
_REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information",
    204: "No Content", 205: "Reset Content", 206: "Partial Content", 207: "Multi-Status",
    208: "Already Reported", 226: "IM Used",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 305: "Use Proxy", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 412: "Precondition Failed", 413: "Payload Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 421: "Misdirected Request", 422: "Unprocessable Entity",
    423: "Locked", 424: "Failed Dependency", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates", 507: "Insufficient Storage", 508: "Loop Detected",
    510: "Not Extended", 511: "Network Authentication Required",
}


def reason_phrase(status: int) -> str:
    """The reason phrase Envoy prints for `status` (also the body of its local replies)."""
    return _REASONS.get(status, "Unknown")


# Built once, as uvicorn does: the request path never formats a status line.
_STATUS_LINES: dict[int, bytes] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason_phrase(code).encode()) for code in range(100, 600)
}
_CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9110 5.5: field values carry no control characters but HTAB (obs-fold arrives unfolded).
_INVALID_VALUE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Header lines joined with "\n" need no more than decoding when they have no control character
# but the separators (a line with a LF in it shows as an extra field) and no name or value ends
# in whitespace (tested apart: a regex alternative for it makes the search 5 times slower).
# The same bytes for bytes.translate(None, ...): deleting them changes the length only when one
# is present (a third of the regex search's time).
_CONTROL_BUT_LF_BYTES = bytes(range(0x00, 0x09)) + bytes(range(0x0b, 0x20)) + b"\x7f"
_WHITESPACE_BYTE = frozenset((b" ", b"\t"))
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


class _LowerNames(dict[str, tuple[str, ...]]):
    """A head's header names (joined with "\\n") -> each lowered, remembered: a peer sends the
    same names message after message (one lookup instead of lower() and split()). Bounded
    (cleared when full; long blocks not kept), since peers choose the names. Any thread."""

    __slots__ = ()

    def __missing__(self, joined: str) -> tuple[str, ...]:
        names = tuple(joined.lower().split("\n"))
        if len(joined) <= _LOWER_NAMES_MAX_LEN:
            if len(self) >= _LOWER_NAMES_MAX_COUNT:
                self.clear()
            self[joined] = names
        return names


_LOWER_NAMES_MAX_LEN = 1024
_LOWER_NAMES_MAX_COUNT = 1024
_lowered_names = _LowerNames()
# An authority is RFC 3986 unreserved / sub-delims / ":" "@" "[" "]" and pct-encoding; Envoy
# answers anything else with 400.
_INVALID_AUTHORITY_CHARS = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@\[\]%]")
# Envoy's codec refuses a Connection header with this many tokens (measured on Envoy 1.40).
_MAX_CONNECTION_TOKENS = 10
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"


class CodecError(Exception):
    """A protocol error in what the peer sent.

    `status` is the local reply Envoy sends for it (400, 413, 426, 431, 501...; 502 for a bad
    upstream response) and `details` Envoy's response-code details ("http1.codec_error", ...).
    Any other exception escaping `feed` is a bug.
    """

    def __init__(self, status: int, details: str, message: str = "") -> None:
        super().__init__(message or details)
        self.status = status
        self.details = details


class ServerCodecCallbacks(Protocol):
    def on_message_begin(self) -> None: ...

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...

    def on_data(self, data: bytes, end_stream: bool) -> None: ...

    def on_trailers(self, trailers: HeaderMap) -> None: ...

    def on_codec_error(self, error: CodecError) -> None: ...


class ClientCodecCallbacks(Protocol):
    def on_1xx(self, headers: HeaderMap) -> None: ...

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...

    def on_data(self, data: bytes, end_stream: bool) -> None: ...

    def on_trailers(self, trailers: HeaderMap) -> None: ...

    def on_codec_error(self, error: CodecError) -> None: ...


def _error_from_parser(exc: Exception) -> CodecError:
    """Map an llhttp error to Envoy's status and details."""
    message = str(exc)
    if "Transfer-Encoding" in message and "Content-Length" not in message:
        # Envoy answers an unknown transfer-coding with 501 (RFC 9112 6.1).
        return CodecError(501, DETAILS_INVALID_TRANSFER_ENCODING, message)
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return CodecError(400, DETAILS_INVALID_URL, message)
    return CodecError(400, DETAILS_CODEC_ERROR, message)


def _new_request_parser(sink: object) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(sink)
    # What Envoy 1.40 (Balsa) accepts beyond strict llhttp: bare LF line ends and obs-fold
    # (unfolded to one space), and any version (all but 1.1 are then HTTP/1.0: 426 unless
    # accepted). Values are still checked for control characters by the codec.
    parser.set_dangerous_leniencies(
        lenient_headers=True, lenient_optional_lf_after_cr=True, lenient_optional_cr_before_lf=True,
        lenient_version=True,
    )
    return parser


_LINEAR_WHITESPACE = re.compile(rb"[ \t]+")


def _collapse_request_line_whitespace(data: bytes) -> bytes:
    """Envoy's parser (Balsa) splits a request line at runs of SP and HTAB; llhttp takes single
    spaces only. The request line starting `data`, when complete in it, gets single spaces.
    (A pipelined request's line later in the same read is left as it is.)"""
    start = len(data) - len(data.lstrip(b"\r\n"))
    end = data.find(b"\n", start)
    if end < 0:
        return data
    line_end = end - 1 if data[end - 1:end] == b"\r" else end
    line = data[start:line_end]
    if b"\t" not in line:
        return data
    return data[:start] + _LINEAR_WHITESPACE.sub(b" ", line.rstrip(b" \t")) + data[line_end:]


def _header_lines(headers: HeaderMap, skip: frozenset[str]) -> tuple[bytes, bool]:
    """Encode the regular headers of `headers` (but `skip`) as one block of lines; also says
    whether they include content-length."""
    # The map is this package's own: its pairs and first-value index are read directly.
    entries = headers._entries
    index = headers.first_values
    if skip is _NO_SKIP or skip.isdisjoint(index):
        # The usual case, joined without a Python call per line: the pseudo-headers lead the
        # map, so the regular ones are the rest. Any line that would start with ":" (an empty
        # or pseudo name out of place) or a value that is not a str takes the general way.
        pseudo = 0
        for entry in entries:
            if entry[0][:1] != ":":
                break
            pseudo += 1
        try:
            text = "\r\n".join(map(": ".join, entries[pseudo:] if pseudo else entries))
        except TypeError:
            text = ":"
        if text[:1] != ":" and "\n:" not in text:
            return (text + "\r\n").encode("latin-1") if text else b"", "content-length" in index
    lines = "".join([f"{key}: {value}\r\n" for key, value in entries if key[0] != ":" and key not in skip])
    return lines.encode("latin-1"), "content-length" in index and "content-length" not in skip


_NO_SKIP: frozenset[str] = frozenset()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _encode_trailer_block(trailers: HeaderMap) -> bytes:
    lines, _ = _header_lines(trailers, _NO_SKIP)
    return b"0\r\n" + lines + _CRLF


class _MessageParser:
    """What httptools calls back: its codec's parser callbacks, which only record and queue events.

    httptools looks its callbacks up once, when a parser is made, so these are the codec's bound
    methods themselves (no call in between); the status line is not needed (no on_status)."""

    __slots__ = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body",
                 "on_message_complete")

    def __init__(self, codec: "_CodecBase") -> None:
        self.on_message_begin = codec._on_message_begin
        self.on_url = codec._on_url
        self.on_header = codec._on_header
        self.on_headers_complete = codec._on_headers_complete
        self.on_body = codec._on_body
        self.on_message_complete = codec._on_message_complete


class _StopParsing(Exception):
    """Raised from a parser callback to end parsing on purpose (HEAD responses, limits)."""


class _CodecBase:
    """Message assembly and limits shared by both directions."""

    def __init__(self, max_headers_kb: int, max_headers_count: int, enable_trailers: bool) -> None:
        self._max_headers_bytes = max_headers_kb * 1024
        self._max_headers_count = max_headers_count
        self._enable_trailers = enable_trailers
        self._events: deque[tuple[Callable[..., None], tuple[object, ...]]] = deque()
        self._error: CodecError | None = None
        # Per message.
        self._in_head = False
        self._headers_done = False
        self._url = b""
        self._pairs: list[tuple[str, str]] = []
        self._trailer_pairs: list[tuple[str, str]] = []
        # Header lines as httptools delivered them (name, value, name, ...), not yet judged: see
        # _on_header. Empty outside _parse.
        self._raw_header_lines: list[bytes] = []
        self._head_bytes = 0  # the parsed part of the head, counted as on the wire
        self._head_raw_bytes = 0  # bytes of whole feeds that were all head (catches huge headers)
        self._has_body = False
        self._messages_completed = 0

    # -- limits -----------------------------------------------------------------------------

    def _check_head_size(self) -> None:
        # Parser callbacks call it only once _head_bytes is over the limit: _head_raw_bytes
        # grows only at the end of _parse, which checks it (and parses nothing more once over).
        if self._head_bytes > self._max_headers_bytes or self._head_raw_bytes > self._max_headers_bytes:
            self._fail(CodecError(431, DETAILS_HEADERS_TOO_LARGE, "headers size exceeds limit"))

    def _fail(self, error: CodecError) -> None:
        if self._error is None:
            self._error = error
            self._events.append((self._deliver_error, (error,)))
        raise _StopParsing

    # -- parser callbacks (queue only) -------------------------------------------------------

    def _on_message_begin(self) -> None:
        self._in_head = True
        self._headers_done = False
        self._url = b""
        self._pairs = []
        self._trailer_pairs = []
        self._head_bytes = 0
        self._head_raw_bytes = 0
        self._has_body = False

    def _on_url(self, url: bytes) -> None:
        self._url += url
        # At least "GET " + url + " HTTP/1.1\r\n"; made exact once the method is known.
        self._head_bytes += len(url) + 15
        if self._head_bytes > self._max_headers_bytes:
            self._check_head_size()

    def _on_header(self, name: bytes, value: bytes) -> None:
        # Only recorded: the lines are judged together by _take_header_lines before anything
        # else can happen to the message (its headers complete, its message completes, the
        # parser fails or stops), in their order, so the outcome is the one of judging each
        # line as it arrives.
        self._raw_header_lines += (name, value)

    def _take_header_lines(self) -> None:
        """Judge and decode the header lines recorded since the last call (raises _StopParsing
        on the first bad one, as _take_header_line)."""
        raw = self._raw_header_lines
        self._raw_header_lines = []
        raw_count = len(raw)
        if not self._headers_done:
            # The usual case at once: plain lines within the limits are only decoded.
            blob = b"\n".join(raw)
            text = blob.decode("latin-1")
            # (" \n" is found faster in the str; a tab is rare, so looked for alone first.)
            if (" \n" not in text and (b"\t" not in blob or b"\t\n" not in blob)
                    and blob[-1:] not in _WHITESPACE_BYTE
                    and len(blob.translate(None, _CONTROL_BUT_LF_BYTES)) == len(blob)):
                fields = text.split("\n")
                pairs = self._pairs
                limit = self._max_headers_bytes
                # Each line counts len(name) + len(value) + 4 (see _take_header_line).
                head_bytes = self._head_bytes + len(blob) + raw_count + 1
                if (len(fields) == raw_count and len(pairs) + (raw_count >> 1) <= self._max_headers_count
                        and head_bytes <= limit and self._head_raw_bytes <= limit):
                    names = _lowered_names["\n".join(fields[0::2])]
                    pairs += zip(names, fields[1::2])
                    self._head_bytes = head_bytes
                    return
        for i in range(0, raw_count, 2):
            self._take_header_line(raw[i], raw[i + 1])

    def _take_header_line(self, name: bytes, value: bytes) -> None:
        if name.endswith((b" ", b"\t")):
            # llhttp lets whitespace follow a name it knows ("Transfer-Encoding : chunked") and
            # then ignores the header's meaning: a smuggling vector Envoy refuses with a 400.
            self._fail(CodecError(400, DETAILS_INVALID_CHARACTERS, "header name contains whitespace"))
        if _INVALID_VALUE_BYTES.search(value) is not None:
            self._fail(CodecError(400, DETAILS_INVALID_CHARACTERS, "header value contains invalid characters"))
        # RFC 9112 5.1: optional whitespace around the value is not part of it (llhttp keeps
        # the trailing part).
        pair = (name.decode("latin-1").lower(), value.rstrip(b" \t").decode("latin-1"))
        if self._headers_done:
            self._trailer_pairs.append(pair)
            if len(self._trailer_pairs) > self._max_headers_count:
                self._fail(CodecError(431, DETAILS_TOO_MANY_HEADERS, "trailers count exceeds limit"))
            return
        self._pairs.append(pair)
        self._head_bytes += len(name) + len(value) + 4
        if len(self._pairs) > self._max_headers_count:
            self._fail(CodecError(431, DETAILS_TOO_MANY_HEADERS, "headers count exceeds limit"))
        self._check_head_size()

    def _on_headers_complete(self) -> None:
        raise NotImplementedError

    def _on_body(self, body: bytes) -> None:
        # Envoy buffers the body bytes of one dispatch (one socket read, or what waited while
        # reading was disabled) and hands them on at once, whatever their chunking.
        events = self._events
        if events and events[-1][0] == self._deliver_data and not events[-1][1][1]:
            events[-1] = (self._deliver_data, (events[-1][1][0] + body, False))
        else:
            events.append((self._deliver_data, (body, False)))

    def _on_message_complete(self) -> None:
        raise NotImplementedError

    def _deliver_data(self, data: bytes, end_stream: bool) -> None:
        raise NotImplementedError

    def _deliver_error(self, error: CodecError) -> None:
        raise NotImplementedError

    def _end_message_event(self) -> tuple[Callable[..., None], tuple[object, ...]]:
        """The event that ends a message with a body: trailers when enabled, else empty data."""
        if self._trailer_pairs and self._enable_trailers:
            return (self._deliver_trailers, (HeaderMap(self._trailer_pairs),))
        return (self._deliver_data, (b"", True))

    def _deliver_trailers(self, trailers: HeaderMap) -> None:
        raise NotImplementedError

    # -- feeding ---------------------------------------------------------------------------

    def _parse(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes) -> None:
        """Run the parser over `data`, turning every llhttp failure into one queued CodecError."""
        head_at_start = self._in_head
        self._messages_completed = 0
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # httptools wraps what a callback raised; only our own _StopParsing is expected.
            if not isinstance(exc.__context__, _StopParsing):
                raise
        except httptools.HttpParserUpgrade:
            self._on_upgrade()
        except httptools.HttpParserError as exc:
            # The header lines parsed before the bad byte are judged first, as they were parsed.
            if self._raw_header_lines:
                self._take_header_lines_after_feed()
            if self._error is None:
                self._on_parser_error(_error_from_parser(exc), data)
        else:
            if self._raw_header_lines:
                self._take_header_lines_after_feed()
            if self._in_head and self._error is None and (head_at_start or not self._messages_completed):
                # All of `data` belongs to the unfinished head (a lower bound when it began
                # here): llhttp only reports a header once complete, so this is what stops an
                # endless one.
                self._head_raw_bytes += len(data)
                try:
                    self._check_head_size()
                except _StopParsing:
                    pass

    def _take_header_lines_after_feed(self) -> None:
        """The lines of a head (or trailers) not complete in this feed, judged at its end."""
        try:
            self._take_header_lines()
        except _StopParsing:
            pass

    def _on_upgrade(self) -> None:
        raise NotImplementedError

    def _on_parser_error(self, error: CodecError, data: bytes) -> None:
        self._error = error
        self._events.append((self._deliver_error, (error,)))


class ServerCodec(_CodecBase):
    """The downstream side: parses requests, encodes responses. One request at a time."""

    def __init__(
        self,
        callbacks: ServerCodecCallbacks,
        *,
        max_request_headers_kb: int = DEFAULT_MAX_HEADERS_KB,
        max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT,
        accept_http_10: bool = False,
        default_host_for_http_10: str = "",
        enable_trailers: bool = False,
        headers_with_underscores_action: int = UNDERSCORES_ALLOW,
        stats: Any = None,
    ) -> None:
        super().__init__(max_request_headers_kb, max_headers_count, enable_trailers)
        self._callbacks = callbacks
        self._accept_http_10 = accept_http_10
        self._default_host_for_http_10 = default_host_for_http_10
        self._underscores_action = headers_with_underscores_action
        # Envoy's http1.* codec counters (dropped_headers_with_underscores,
        # requests_rejected_with_underscores_in_headers), when given.
        self._stats = stats
        self._parser = _new_request_parser(_MessageParser(self))
        self._paused = False
        # Set when a complete request was delivered; cleared when its response is encoded.
        self._awaiting_response = False
        self._dispatching = False
        # What the current request says about its response (read by the connection manager).
        self.protocol = "HTTP/1.1"
        self.keep_alive = True
        self.is_head_request = False
        self._upgrade = False
        self._pending_headers: tuple[HeaderMap, str, bool, str] | None = None
        self._deferred_error: CodecError | None = None
        self._deferred_bytes = 0
        # For telling where a failed message began (see _failed_message_offset).
        self._in_message = False
        self._idle_at_feed_start = True
        self._content_length: int | None = None
        self._completed_body_length: int | None = None
        # Response encoding state.
        self._chunk_encoding = False
        self._response_body_allowed = True
        self._response_started = False
        self._response_complete = False

    # -- public: parsing -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse `data` and deliver the events it completes (unless paused)."""
        if self._deferred_error is not None:
            self._deferred_bytes += len(data)
            if b"\n" in data or self._deferred_bytes > self._max_headers_bytes:
                self._release_deferred_error()
        elif self._error is None and not self._upgrade:
            self._idle_at_feed_start = not self._in_message
            if self._idle_at_feed_start and b"\t" in data:
                data = _collapse_request_line_whitespace(data)
            self._parse(self._parser, data)
        self._dispatch()

    def _on_parser_error(self, error: CodecError, data: bytes) -> None:
        # Envoy's parser (Balsa) judges a line only once it is complete: junk with no line end
        # yet makes it wait, not answer 400. llhttp fails at the first bad byte, so when a new
        # message's first line failed before any line end, hold the error until one arrives.
        first_line_failed = self._in_head and not self._url and not self._pairs
        if first_line_failed and self._events and self._events[-1][0] == self._deliver_begin:
            start = self._failed_message_offset(data)
            if start is not None:
                junk = data[start:].lstrip(b"\r\n")
                if junk and b"\n" not in junk:
                    self._events.pop()  # this message's begin: delivered with the error, if ever
                    self._deferred_error = error
                    return
        super()._on_parser_error(error, data)

    def _failed_message_offset(self, data: bytes) -> int | None:
        """Where in `data` the failed message began, when it can be told without llhttp's offset:
        at the start, or right after one bodiless or content-length request that began there."""
        if not self._idle_at_feed_start:
            return None
        if self._messages_completed == 0:
            return 0
        if self._messages_completed == 1 and self._completed_body_length is not None:
            skipped = len(data) - len(data.lstrip(b"\r\n"))
            end_of_head = _EMPTY_LINE.search(data, skipped)
            if end_of_head is not None:
                return end_of_head.end() + self._completed_body_length
        return None

    def _release_deferred_error(self) -> None:
        error, self._deferred_error = self._deferred_error, None
        assert error is not None
        self._error = error
        self._events.append((self._deliver_begin, ()))
        self._events.append((self._deliver_error, (error,)))

    def pause(self) -> None:
        """Stop delivering events (flow control); data fed meanwhile is parsed and queued."""
        self._paused = True

    def resume(self) -> None:
        """Deliver queued events again; once the response is complete, also the next request.

        As Envoy's parser pause after each request: the caller resumes when it is done with
        the current stream, never from inside the codec.
        """
        self._paused = False
        if self._response_complete:
            self._awaiting_response = False
        if self._events:  # (the usual keep-alive resume has nothing queued)
            self._dispatch()

    @property
    def paused(self) -> bool:
        """True when events are held back: explicitly paused, or a response is awaited."""
        return self._paused or self._awaiting_response

    @property
    def has_pending_events(self) -> bool:
        """True when parsed events wait for delivery (the caller should stop reading)."""
        return bool(self._events)

    @property
    def has_pending_request(self) -> bool:
        """True when another request (pipelined) already waits among the parsed events."""
        events = self._events
        return bool(events) and any(event[0] == self._deliver_begin for event in events)

    # -- public: encoding ------------------------------------------------------------------

    def encode_100_continue(self) -> bytes:
        return _CONTINUE_100

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> bytes:
        """The status line and headers of a response (`:status` required), with Envoy's framing.

        Adds `content-length: 0` to a headers-only response (not 1xx/204, not to HEAD), and
        `transfer-encoding: chunked` when a body follows without a content-length.
        """
        status = int(headers.first_values.get(":status") or 0)
        lines, saw_content_length = _header_lines(headers, _NO_SKIP)
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        if self.protocol == "HTTP/1.0":
            status_line = b"HTTP/1.0" + status_line[8:]  # Envoy answers HTTP/1.0 in kind
        if 100 <= status < 200:
            return status_line + lines + _CRLF
        self._response_started = True
        # Envoy's codec writes whatever body it is given, even on 204/304 (a direct_response
        # 204 with a body goes out with it); only HEAD answers never carry one.
        self._response_body_allowed = not self.is_head_request
        self._chunk_encoding = False
        if not saw_content_length:
            # The branches of Envoy's StreamEncoderImpl::encodeHeadersBase, in its order (so a
            # headers-only answer to HEAD does announce chunked, as Envoy's does).
            if status == 204 or status == 304:
                pass
            elif end_stream and not self.is_head_request:
                lines += b"content-length: 0\r\n"
            elif self.protocol == "HTTP/1.1":
                lines += b"transfer-encoding: chunked\r\n"
                self._chunk_encoding = self._response_body_allowed
        if end_stream:
            self._response_complete = True  # _end_response
        return status_line + lines + _CRLF

    def encode_data(self, data: bytes, end_stream: bool) -> bytes:
        out = b""
        if data and self._response_body_allowed:
            out = _chunk(data) if self._chunk_encoding else bytes(data)
        if end_stream:
            if self._chunk_encoding:
                out += _LAST_CHUNK
            self._response_complete = True  # _end_response
        return out

    def encode_trailers(self, trailers: HeaderMap) -> bytes:
        """End a response with trailers; dropped (last chunk only) unless trailers are enabled."""
        out = b""
        if self._chunk_encoding:
            out = _encode_trailer_block(trailers) if self._enable_trailers else _LAST_CHUNK
        self._end_response()
        return out

    @property
    def response_started(self) -> bool:
        return self._response_started

    def _end_response(self) -> None:
        self._response_complete = True

    # -- parser callbacks ------------------------------------------------------------------

    def _on_message_begin(self) -> None:
        super()._on_message_begin()
        self._in_message = True
        self._events.append((self._deliver_begin, ()))

    def _on_headers_complete(self) -> None:
        if self._raw_header_lines:
            self._take_header_lines()
        self._in_head = False
        self._headers_done = True
        parser = self._parser
        raw_method = parser.get_method()
        # The whole head as Envoy's parser counts it: request line, header lines, blank line.
        self._head_bytes += len(raw_method) - 3 + 2
        if self._head_bytes > self._max_headers_bytes:
            self._check_head_size()
        version = parser.get_http_version()
        protocol = "HTTP/1.1" if version == "1.1" else "HTTP/1.0"
        if protocol != "HTTP/1.1" and not self._accept_http_10:
            self._fail(CodecError(426, DETAILS_LOW_VERSION, "Upgrade required for HTTP/1.0 or HTTP/0.9"))
        method = raw_method.decode("latin-1")
        if self._underscores_action != UNDERSCORES_ALLOW:
            self._check_underscores()
        headers = self._request_headers(method)
        if protocol == "HTTP/1.0" and self._default_host_for_http_10 and ":authority" not in headers:
            headers = HeaderMap([(":authority", self._default_host_for_http_10), *headers.items()])
        index = headers.first_values
        # _check_request_headers when there is something to check: an authority that is not
        # plain, or a Connection header.
        authority = index.get(":authority")
        if "connection" in index or (authority is not None and _INVALID_AUTHORITY_CHARS.search(authority) is not None):
            self._check_request_headers(headers)
        content_length = index.get("content-length")
        transfer_encoding = index.get("transfer-encoding")
        chunked = transfer_encoding is not None
        if chunked and transfer_encoding.strip().lower() != "chunked":  # type: ignore[union-attr]
            # Envoy implements no transfer-coding but chunked (RFC 9112 6.1: 501).
            self._fail(CodecError(501, DETAILS_INVALID_TRANSFER_ENCODING, "unsupported transfer encoding"))
        self._has_body = chunked or (content_length is not None and content_length.strip() not in ("", "0"))
        # The body's length when framed by content-length (None when chunked).
        length_framed = not chunked and content_length is not None and content_length.strip().isdigit()
        self._content_length = int(content_length) if length_framed else None  # type: ignore[arg-type]
        keep_alive = parser.should_keep_alive()
        if self._has_body:
            self._events.append((self._deliver_headers, (headers, False, protocol, keep_alive, method)))
        else:
            self._pending_headers = (headers, protocol, keep_alive, method)

    def _check_underscores(self) -> None:
        """HttpProtocolOptions.headers_with_underscores_action for the request's header names."""
        if not any("_" in key for key, _ in self._pairs):
            return
        if self._underscores_action == UNDERSCORES_REJECT_REQUEST:
            if self._stats is not None:
                self._stats.requests_rejected_with_underscores_in_headers.inc()
            self._fail(CodecError(400, DETAILS_UNEXPECTED_UNDERSCORE, "header name contains underscores"))
        kept = [(key, value) for key, value in self._pairs if "_" not in key]
        if self._stats is not None:
            self._stats.dropped_headers_with_underscores.inc(len(self._pairs) - len(kept))
        self._pairs = kept

    def _check_request_headers(self, headers: HeaderMap) -> None:
        """The checks Envoy's codec makes once a request's headers are in (before any filter)."""
        get = headers.first_values.get
        authority = get(":authority")
        if authority is not None and _INVALID_AUTHORITY_CHARS.search(authority) is not None:
            self._fail(CodecError(400, DETAILS_INVALID_AUTHORITY, "invalid authority"))
        connection = get("connection")
        if connection is not None:
            # Utility::sanitizeConnectionHeader: no pseudo-headers, and only a few nominations.
            tokens = [t.strip() for t in connection.split(",") if t.strip()]
            if len(tokens) >= _MAX_CONNECTION_TOKENS or any(t.startswith(":") for t in tokens):
                self._fail(CodecError(400, DETAILS_CONNECTION_HEADER_REJECTED,
                                      "Invalid nominated headers in Connection."))

    def _request_headers(self, method: str) -> HeaderMap:
        url = self._url.decode("latin-1")
        host = None
        regular: list[tuple[str, str]] = []
        for key, value in self._pairs:
            if key == "host":
                # Envoy keeps one :authority and appends repeated values with ",".
                host = value if host is None else f"{host},{value}"
                continue
            regular.append((key, value))
        path = url
        scheme = "http"
        absolute_form = method != "CONNECT" and url[:1] not in ("/", "*")
        if absolute_form:
            # RFC 9112 3.2.2: a proxy takes the authority of an absolute-form target over Host.
            sep = url.find("://")
            if sep <= 0:
                self._fail(CodecError(400, DETAILS_INVALID_URL, "invalid url in request line"))
            scheme = url[:sep].lower()
            rest = url[sep + 3 :]
            slash = rest.find("/")
            host, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
            if scheme not in ("http", "https") or not host:
                self._fail(CodecError(400, DETAILS_INVALID_URL, "invalid url in request line"))
        # Envoy's map order: :authority (from Host, the first header parsed), :path, :method,
        # :scheme; an absolute-form target sets :scheme with the authority, before :path.
        pseudo = []
        if method == "CONNECT":
            host = url
        if host is not None:
            pseudo.append((":authority", host))
        if absolute_form:
            pseudo.append((":scheme", scheme))
        if method != "CONNECT":
            pseudo.append((":path", path))
        pseudo.append((":method", method))
        if not absolute_form:
            pseudo.append((":scheme", scheme))
        pseudo += regular
        return HeaderMap.from_lower_pairs(pseudo)

    def _on_message_complete(self) -> None:
        if self._raw_header_lines:
            self._take_header_lines()  # trailers
        self._messages_completed += 1
        self._in_message = False
        self._completed_body_length = self._content_length if self._has_body else 0
        if self._has_body:
            self._events.append(self._end_message_event())
        else:
            assert self._pending_headers is not None
            headers, protocol, keep_alive, method = self._pending_headers
            self._events.append((self._deliver_headers, (headers, True, protocol, keep_alive, method)))
        self._events.append((self._deliver_request_complete, ()))

    def _on_upgrade(self) -> None:
        # llhttp has completed the request; without upgrade support it is answered (403 by the
        # connection manager) and nothing after its headers is parsed.
        self._upgrade = True

    # -- delivery --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._dispatching:
            return  # a callback fed or resumed us: the outer loop continues
        self._dispatching = True
        try:
            events = self._events
            while events and not self._paused and not self._awaiting_response:
                fn, args = events.popleft()
                fn(*args)
        finally:
            self._dispatching = False

    def _deliver_begin(self) -> None:
        self.protocol = "HTTP/1.1"
        self.keep_alive = True
        self.is_head_request = False
        self._response_started = False
        self._response_complete = False
        self._chunk_encoding = False
        self._callbacks.on_message_begin()

    def _deliver_headers(
        self, headers: HeaderMap, end_stream: bool, protocol: str, keep_alive: bool, method: str
    ) -> None:
        self.protocol = protocol
        self.keep_alive = keep_alive
        self.is_head_request = method == "HEAD"
        self._callbacks.on_headers(headers, end_stream)

    def _deliver_data(self, data: bytes, end_stream: bool) -> None:
        self._callbacks.on_data(data, end_stream)

    def _deliver_trailers(self, trailers: HeaderMap) -> None:
        self._callbacks.on_trailers(trailers)

    def _deliver_request_complete(self) -> None:
        # As Envoy's parser pause after onMessageComplete: the next request waits for resume().
        self._awaiting_response = True

    def _deliver_error(self, error: CodecError) -> None:
        self._events.clear()
        self._callbacks.on_codec_error(error)


# Requests whose empty body gets no "content-length: 0" upstream (measured on Envoy 1.40:
# POST, PUT, PATCH, OPTIONS do get one).
_BODILESS_METHODS = frozenset(("GET", "HEAD", "DELETE", "TRACE", "CONNECT"))
_CLIENT_SKIP = frozenset(("host",))


class ClientCodec(_CodecBase):
    """The upstream side: encodes one request at a time and parses its response."""

    def __init__(
        self,
        callbacks: ClientCodecCallbacks,
        *,
        max_response_headers_kb: int = DEFAULT_MAX_HEADERS_KB,
        max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT,
        enable_trailers: bool = False,
    ) -> None:
        super().__init__(max_response_headers_kb, max_headers_count, enable_trailers)
        self._callbacks = callbacks
        # Body events call the callbacks' on_data themselves (no _deliver_data frame between).
        self._deliver_data = callbacks.on_data  # type: ignore[method-assign]
        # One callbacks object for the parser of each response (encode_request_headers).
        self._message_parser = _MessageParser(self)
        self._parser = httptools.HttpResponseParser(self._message_parser)
        self._is_head_request = False
        self._chunk_encoding = False
        self._response_complete = False
        # Set once a response completed with its message: what the parser meets after it is
        # ignored (see _on_message_complete).
        self._after_response = False
        self._status = 0
        self._is_1xx = False
        # True after a complete response when the connection may carry another request.
        self.keep_alive = False

    # -- encoding --------------------------------------------------------------------------

    def encode_request_headers(self, headers: HeaderMap, end_stream: bool) -> bytes:
        """Request line from :method/:path, `host` from :authority, then the regular headers."""
        get = headers.first_values.get
        method = get(":method") or "GET"
        path = get(":path") or "/"
        authority = get(":authority")
        if method == "CONNECT":
            path = authority or path
        self._is_head_request = method == "HEAD"
        self._response_complete = False
        self.keep_alive = False
        self._parser = httptools.HttpResponseParser(self._message_parser)
        self._after_response = False
        self._error = None
        self._events.clear()
        lines, saw_content_length = _header_lines(headers, _CLIENT_SKIP)
        if authority is None:
            authority = get("host")
        if authority is not None:
            head = f"{method} {path} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")
        else:
            head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
        self._chunk_encoding = False
        if not saw_content_length:
            if end_stream:
                if method not in _BODILESS_METHODS:
                    lines += b"content-length: 0\r\n"
            else:
                lines += b"transfer-encoding: chunked\r\n"
                self._chunk_encoding = True
        return head + lines + _CRLF

    def encode_data(self, data: bytes, end_stream: bool) -> bytes:
        out = b""
        if data:
            out = _chunk(data) if self._chunk_encoding else bytes(data)
        if end_stream and self._chunk_encoding:
            out += _LAST_CHUNK
        return out

    def encode_trailers(self, trailers: HeaderMap) -> bytes:
        if not self._chunk_encoding:
            return b""
        return _encode_trailer_block(trailers) if self._enable_trailers else _LAST_CHUNK

    # -- parsing ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse response bytes and deliver events."""
        if self._error is None and not self._response_complete:
            self._parse(self._parser, data)
        events = self._events  # _dispatch, inline
        while events:
            fn, args = events.popleft()
            fn(*args)

    def feed_eof(self) -> None:
        """The upstream closed: ends a close-delimited body, or is an error mid-response."""
        if self._error is None and not self._response_complete:
            if self._headers_done and not self._has_body:
                # Neither content-length nor chunked: RFC 9112 6.3 rule 8, the body ends at close.
                self._response_complete = True
                self.keep_alive = False
                self._events.append((self._deliver_data, (b"", True)))
            else:
                self._error = CodecError(502, DETAILS_CODEC_ERROR, "upstream closed before the response completed")
                self._events.append((self._deliver_error, (self._error,)))
        self._dispatch()

    @property
    def response_complete(self) -> bool:
        return self._response_complete

    def _on_headers_complete(self) -> None:
        if self._raw_header_lines:
            self._take_header_lines()
        self._in_head = False
        self._headers_done = True
        self._head_bytes += 2
        if self._head_bytes > self._max_headers_bytes:
            self._check_head_size()
        parser = self._parser
        self._status = parser.get_status_code()
        self._is_1xx = 100 <= self._status < 200 and self._status != 101
        pairs = [(":status", str(self._status))]
        pairs += self._pairs
        headers = HeaderMap.from_lower_pairs(pairs)
        if self._is_1xx:
            self._events.append((self._callbacks.on_1xx, (headers,)))
            return
        index = headers.first_values
        content_length = index.get("content-length")
        chunked = "chunked" in (index.get("transfer-encoding") or "").lower()
        no_body = self._is_head_request or self._status in (204, 304)
        # has_body False with a body following means "delimited by close" (see feed_eof).
        self._has_body = not no_body and (chunked or content_length is not None)
        body_follows = not no_body and (chunked or content_length is None or content_length.strip() != "0")
        if not body_follows:
            self._events.append((self._callbacks.on_headers, (headers, True)))
            self._response_complete = True
            self.keep_alive = parser.should_keep_alive()
            if self._is_head_request:
                raise _StopParsing  # llhttp would wait for the body the headers announce
            return
        self._events.append((self._callbacks.on_headers, (headers, False)))

    def _on_message_complete(self) -> None:
        if self._raw_header_lines:
            self._take_header_lines()  # trailers
        if self._is_1xx:
            return  # the final response follows on the same parser
        if self._response_complete:
            return  # already ended at its headers
        self._events.append(self._end_message_event() if self._trailer_pairs else (self._deliver_data, (b"", True)))
        self._response_complete = True
        self.keep_alive = self._parser.should_keep_alive()
        # One response per request: bytes after it are not a response to us. Rather than stop
        # the parser here (an exception on every response), whatever it meets next is ignored:
        # a next message stops it as it begins, a parser error or an upgrade is dropped.
        self._after_response = True

    def _on_message_begin(self) -> None:
        if self._after_response:
            raise _StopParsing
        super()._on_message_begin()

    def _on_parser_error(self, error: CodecError, data: bytes) -> None:
        if not self._after_response:
            super()._on_parser_error(error, data)

    def _on_upgrade(self) -> None:
        if self._after_response:
            return
        self._error = CodecError(502, DETAILS_CODEC_ERROR, "upgrade responses are not supported")
        self._events.append((self._deliver_error, (self._error,)))

    def _dispatch(self) -> None:
        events = self._events
        while events:
            fn, args = events.popleft()
            fn(*args)

    def _deliver_trailers(self, trailers: HeaderMap) -> None:
        self._callbacks.on_trailers(trailers)

    def _deliver_error(self, error: CodecError) -> None:
        self._events.clear()
        self._callbacks.on_codec_error(error)
