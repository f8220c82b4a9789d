"""FilterManager: one stream's HTTP filter chain, with Envoy's iteration semantics.

A port of the iteration rules of Envoy's source/common/http/filter_manager.cc, which every
filter (the router, the Wasm bridge) relies on:

* decoder filters run in chain order, encoder filters in reverse order;
* a filter that stops (StopIteration / StopAll* / Stop*Buffer) is resumed by
  continue_decoding() / continue_encoding(), from any later event, and iteration carries
  on from the next filter (or, after a StopAll*, from the stopped filter itself for the
  data and trailers it has not seen yet);
* data is buffered in one buffer per direction while a filter holds it; past the buffer
  limit a request gets 413, a response 500 (or flow control with the *Watermark statuses);
* the last decoder filter (the terminal one) never stops the chain for the data that
  follows: Envoy lets it buffer while an earlier filter adds body;
* send_local_reply() from any point answers through the encoder filters, or straight to
  the codec while encoding, or resets the stream once response headers went out;
* access log handlers run, then every filter's on_destroy, exactly once.

The owner (the connection manager's ActiveStream) supplies `FilterManagerCallbacks`: what
reaches the codec, plus route and timeout hooks. Dispatcher thread only.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .codec import reason_phrase
from .filter import (
    AccessLogHandler,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
    StreamDecoderFilter,
    StreamEncoderFilter,
)
from .headers import HeaderMap

if TYPE_CHECKING:
    from ..event.dispatcher import Dispatcher
    from .stream_info import StreamInfo

# Envoy's default per_connection_buffer_limit_bytes, which also bounds each stream's buffers.
DEFAULT_BUFFER_LIMIT = 1024 * 1024

# StreamInfo::ResponseCodeDetails used here.
DETAILS_REQUEST_PAYLOAD_TOO_LARGE = "request_payload_too_large"
DETAILS_RESPONSE_PAYLOAD_TOO_LARGE = "response_payload_too_large"

# Grpc::Utility::httpToGrpcStatus, for local replies to gRPC requests.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


class IterationState(enum.Enum):
    Continue = 0
    StopSingleIteration = 1
    StopAllBuffer = 2
    StopAllWatermark = 3


# Module-level names for the members and statuses the per-request paths compare against.
_CONTINUE = IterationState.Continue
_STOP_SINGLE = IterationState.StopSingleIteration
_STOP_ALL_BUFFER = IterationState.StopAllBuffer
_STOP_ALL_WATERMARK = IterationState.StopAllWatermark
_HEADERS_CONTINUE = FilterHeadersStatus.Continue
_HEADERS_CONTINUE_NO_END = FilterHeadersStatus.ContinueAndDontEndStream
_HEADERS_STOP = FilterHeadersStatus.StopIteration
_DATA_CONTINUE = FilterDataStatus.Continue


class FilterManagerCallbacks(Protocol):
    """What the FilterManager needs from its owner (Envoy's FilterManagerCallbacks)."""

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        """Response headers leave the chain: add HCM headers, write through the codec."""

    def encode_1xx_headers(self, headers: HeaderMap) -> None: ...

    def encode_data(self, data: bytes, end_stream: bool) -> None: ...

    def encode_trailers(self, trailers: HeaderMap) -> None: ...

    def end_stream(self) -> None:
        """The response is complete (Envoy's endStream -> doEndStream)."""

    def reset_stream(self) -> None:
        """Abort the downstream stream (HTTP/1: close the connection)."""

    def create_filter_chain(self) -> None:
        """Install the filters if not done yet (Envoy does it for early local replies too, so
        encoder filters and access logs see them)."""

    def route(self) -> object | None: ...

    def clear_route_cache(self) -> None: ...

    def disarm_request_timeout(self) -> None: ...

    def on_request_data_too_large(self) -> None: ...

    def on_local_reply(self, status: int) -> None:
        """Optional: a local reply with `status` is about to be sent (the HCM's own part of it)."""

    def on_response_data_too_large(self) -> None: ...

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        """Stop reading from downstream (request data is buffered above the limit)."""

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None: ...

    def on_encoder_filter_above_write_buffer_high_watermark(self) -> None:
        """Tell upstream to stop sending (response data is buffered above the limit)."""

    def on_encoder_filter_below_write_buffer_low_watermark(self) -> None: ...

    def add_downstream_watermark_callbacks(self, callbacks: Any) -> None: ...

    def remove_downstream_watermark_callbacks(self, callbacks: Any) -> None: ...


class _ActiveFilter:
    """State Envoy keeps per filter per direction (ActiveStreamFilterBase)."""

    __slots__ = (
        "parent",
        "handle",
        "iteration_state",
        "iterate_from_current_filter",
        "headers_continued",
        "end_stream",
        "processed_headers",
    )

    def __init__(self, parent: "FilterManager", handle: Any) -> None:
        self.parent = parent
        self.handle = handle
        self.iteration_state = _CONTINUE
        self.iterate_from_current_filter = False
        self.headers_continued = False
        self.end_stream = False
        self.processed_headers = False

    # -- shared by both directions -------------------------------------------------------

    def stopped_all(self) -> bool:
        state = self.iteration_state
        return state is _STOP_ALL_BUFFER or state is _STOP_ALL_WATERMARK

    def can_iterate(self) -> bool:
        return self.iteration_state is _CONTINUE

    def handle_after_headers(self, status: FilterHeadersStatus) -> bool:
        """commonHandleAfterHeadersCallback: True when iteration goes on to the next filter."""
        if status == _HEADERS_CONTINUE or status == _HEADERS_CONTINUE_NO_END:
            self.headers_continued = True
        elif status == FilterHeadersStatus.StopIteration:
            self.iteration_state = _STOP_SINGLE
        elif status == FilterHeadersStatus.StopAllIterationAndBuffer:
            self.iteration_state = _STOP_ALL_BUFFER
        elif status == FilterHeadersStatus.StopAllIterationAndWatermark:
            self.iteration_state = _STOP_ALL_WATERMARK
        else:  # not a FilterHeadersStatus: as Continue
            self.headers_continued = True
        return self.iteration_state is _CONTINUE  # can_iterate()

    def handle_after_data(self, status: FilterDataStatus, data: bytearray) -> bool:
        """commonHandleAfterDataCallback: True when iteration goes on to the next filter."""
        if status == FilterDataStatus.Continue:
            if self.iteration_state is IterationState.StopSingleIteration:
                self.buffer_data(data)
                self.common_continue()
                return False
            return True
        self.iteration_state = IterationState.StopSingleIteration
        if status in (FilterDataStatus.StopIterationAndBuffer, FilterDataStatus.StopIterationAndWatermark):
            self._set_streaming(status == FilterDataStatus.StopIterationAndWatermark)
            self.buffer_data(data)
        elif self.complete() and not self.has_trailers() and self.buffered() is None and not self.parent.destroyed:
            # A zero-byte end-of-stream held with NoBuffer: keep an empty buffer so that
            # continuing resumes with data(b"", end_stream=True).
            self._set_buffer(bytearray())
        return False

    def handle_after_trailers(self, status: FilterTrailersStatus) -> bool:
        if status == FilterTrailersStatus.Continue:
            if self.iteration_state is IterationState.StopSingleIteration:
                self.common_continue()
                return False
            return True
        if self.can_iterate():
            self.iteration_state = IterationState.StopSingleIteration
        return False

    def buffer_data(self, data: bytearray) -> None:
        """commonHandleBufferData: move `data` into the stream's buffer (unless it is the buffer)."""
        buffered = self.buffered()
        if buffered is data:
            return
        if buffered is None:
            buffered = bytearray()
            self._set_buffer(buffered)
        buffered += data
        data.clear()
        self._check_buffer_limit(buffered)

    def common_continue(self) -> None:
        """commonContinue: resume iteration after this filter (headers, then data, then trailers)."""
        parent = self.parent
        if parent.destroyed or self._local_complete_for_direction():
            return
        if self.stopped_all():
            self.iterate_from_current_filter = True
        self.iteration_state = IterationState.Continue
        if not self.headers_continued:
            self.headers_continued = True
            self.do_headers(self.complete() and self.buffered() is None and not self.has_trailers())
        had_trailers = self.has_trailers()
        buffered = self.buffered()
        if buffered is not None:
            self.do_data(buffered, self.complete() and not had_trailers)
        if had_trailers:
            self.do_trailers()
        self.iterate_from_current_filter = False

    # -- per direction -------------------------------------------------------------------

    def complete(self) -> bool:
        raise NotImplementedError

    def has_trailers(self) -> bool:
        raise NotImplementedError

    def buffered(self) -> bytearray | None:
        raise NotImplementedError

    def _set_buffer(self, buf: bytearray) -> None:
        raise NotImplementedError

    def _set_streaming(self, streaming: bool) -> None:
        raise NotImplementedError

    def _check_buffer_limit(self, buf: bytearray) -> None:
        raise NotImplementedError

    def _local_complete_for_direction(self) -> bool:
        raise NotImplementedError

    def do_headers(self, end_stream: bool) -> None:
        raise NotImplementedError

    def do_data(self, data: bytearray, end_stream: bool) -> None:
        raise NotImplementedError

    def do_trailers(self) -> None:
        raise NotImplementedError

    # -- StreamFilterCallbacks -----------------------------------------------------------

    @property
    def dispatcher(self) -> "Dispatcher":
        return self.parent.dispatcher

    @property
    def stream_info(self) -> "StreamInfo":
        return self.parent.stream_info

    @property
    def stream_id(self) -> int:
        return self.parent.stream_id

    def route(self) -> object | None:
        return self.parent.callbacks.route()

    def clear_route_cache(self) -> None:
        self.parent.callbacks.clear_route_cache()

    def reset_stream(self) -> None:
        self.parent.reset_stream()

    def send_local_reply(
        self,
        status: int,
        body: bytes | str,
        modify_headers: Callable[[HeaderMap], None] | None = None,
        grpc_status: int | None = None,
        details: str = "",
    ) -> None:
        self.parent.send_local_reply(status, body, modify_headers, grpc_status, details)


class ActiveStreamDecoderFilter(_ActiveFilter):
    """A decoder filter in the chain, and its StreamDecoderFilterCallbacks."""

    __slots__ = ()

    handle: StreamDecoderFilter

    def complete(self) -> bool:
        return self.parent.remote_decode_complete

    def has_trailers(self) -> bool:
        return self.parent.request_trailers is not None

    def buffered(self) -> bytearray | None:
        return self.parent.buffered_request_data

    def _set_buffer(self, buf: bytearray) -> None:
        self.parent.buffered_request_data = buf

    def _set_streaming(self, streaming: bool) -> None:
        self.parent.decoder_filters_streaming = streaming

    def _local_complete_for_direction(self) -> bool:
        return self.parent.local_complete

    def _check_buffer_limit(self, buf: bytearray) -> None:
        parent = self.parent
        if len(buf) <= parent.buffer_limit or parent.decoder_above_high_watermark:
            return
        if parent.decoder_filters_streaming:
            parent.decoder_above_high_watermark = True
            parent.callbacks.on_decoder_filter_above_write_buffer_high_watermark()
        else:
            parent.callbacks.on_request_data_too_large()
            parent.send_local_reply(413, reason_phrase(413), None, None, DETAILS_REQUEST_PAYLOAD_TOO_LARGE)

    def do_headers(self, end_stream: bool) -> None:
        assert self.parent.request_headers is not None
        self.parent.decode_headers_from(self, self.parent.request_headers, end_stream)

    def do_data(self, data: bytearray, end_stream: bool) -> None:
        self.parent.decode_data_from(self, data, end_stream, start_from_current=True)

    def do_trailers(self) -> None:
        assert self.parent.request_trailers is not None
        self.parent.decode_trailers_from(self, self.parent.request_trailers)

    # -- StreamDecoderFilterCallbacks ----------------------------------------------------

    def continue_decoding(self) -> None:
        self.common_continue()

    def decoding_buffer(self) -> bytearray | None:
        return self.parent.buffered_request_data

    def add_decoded_data(self, data: bytes | bytearray, streaming: bool) -> None:
        self.parent.add_decoded_data(self, data, streaming)

    def add_decoded_trailers(self) -> HeaderMap:
        return self.parent.add_decoded_trailers()

    @property
    def request_headers(self) -> HeaderMap | None:
        return self.parent.request_headers

    @property
    def request_trailers(self) -> HeaderMap | None:
        return self.parent.request_trailers

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.parent.response_headers = headers
        self.parent.encode_headers_from(None, headers, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.parent.encode_data_from(None, bytearray(data), end_stream, start_from_current=False)

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.parent.response_trailers = trailers
        self.parent.encode_trailers_from(None, trailers)

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        self.parent.encode_1xx_headers(headers)

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.parent.callbacks.on_decoder_filter_above_write_buffer_high_watermark()

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.parent.callbacks.on_decoder_filter_below_write_buffer_low_watermark()

    def add_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        """Be told when the downstream connection cannot take more response data (and when it can):
        `callbacks.on_above_write_buffer_high_watermark()` / `on_below_write_buffer_low_watermark()`."""
        self.parent.callbacks.add_downstream_watermark_callbacks(callbacks)

    def remove_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        self.parent.callbacks.remove_downstream_watermark_callbacks(callbacks)


class ActiveStreamEncoderFilter(_ActiveFilter):
    """An encoder filter in the chain, and its StreamEncoderFilterCallbacks."""

    __slots__ = ()

    handle: StreamEncoderFilter

    def complete(self) -> bool:
        return self.parent.local_complete

    def has_trailers(self) -> bool:
        return self.parent.response_trailers is not None

    def buffered(self) -> bytearray | None:
        return self.parent.buffered_response_data

    def _set_buffer(self, buf: bytearray) -> None:
        self.parent.buffered_response_data = buf

    def _set_streaming(self, streaming: bool) -> None:
        self.parent.encoder_filters_streaming = streaming

    def _local_complete_for_direction(self) -> bool:
        return self.parent.remote_encode_complete

    def _check_buffer_limit(self, buf: bytearray) -> None:
        parent = self.parent
        if len(buf) <= parent.buffer_limit or parent.encoder_above_high_watermark:
            return
        if parent.encoder_filters_streaming:
            parent.encoder_above_high_watermark = True
            parent.callbacks.on_encoder_filter_above_write_buffer_high_watermark()
        else:
            parent.callbacks.on_response_data_too_large()
            parent.send_local_reply(500, reason_phrase(500), None, None, DETAILS_RESPONSE_PAYLOAD_TOO_LARGE)

    def do_headers(self, end_stream: bool) -> None:
        assert self.parent.response_headers is not None
        self.parent.encode_headers_from(self, self.parent.response_headers, end_stream)

    def do_data(self, data: bytearray, end_stream: bool) -> None:
        self.parent.encode_data_from(self, data, end_stream, start_from_current=True)

    def do_trailers(self) -> None:
        assert self.parent.response_trailers is not None
        self.parent.encode_trailers_from(self, self.parent.response_trailers)

    # -- StreamEncoderFilterCallbacks ----------------------------------------------------

    def continue_encoding(self) -> None:
        self.common_continue()

    def encoding_buffer(self) -> bytearray | None:
        return self.parent.buffered_response_data

    def add_encoded_data(self, data: bytes | bytearray, streaming: bool) -> None:
        self.parent.add_encoded_data(self, data, streaming)

    def add_encoded_trailers(self) -> HeaderMap:
        return self.parent.add_encoded_trailers()

    @property
    def response_headers(self) -> HeaderMap | None:
        return self.parent.response_headers

    @property
    def response_trailers(self) -> HeaderMap | None:
        return self.parent.response_trailers


# filter_call_state bits (Envoy's FilterCallState).
_DECODE_HEADERS = 0x01
_DECODE_DATA = 0x02
_DECODE_TRAILERS = 0x04
_ENCODE_HEADERS = 0x08
_ENCODE_DATA = 0x10
_ENCODE_TRAILERS = 0x20
_IS_DECODING = _DECODE_HEADERS | _DECODE_DATA | _DECODE_TRAILERS
_IS_ENCODING = _ENCODE_HEADERS | _ENCODE_DATA | _ENCODE_TRAILERS
_BUFFERING_DATA_STATUSES = (FilterDataStatus.StopIterationAndBuffer, FilterDataStatus.StopIterationAndWatermark)


class FilterManager:
    """One stream's filter chain. Also the FilterChainFactoryCallbacks filter factories use."""

    # Per-stream state that starts out the same for every stream is given here, at class level,
    # and set on the instance when it changes (a stream's __init__ sets only what it must).
    request_headers: HeaderMap | None = None
    request_trailers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    buffered_request_data: bytearray | None = None
    buffered_response_data: bytearray | None = None
    decoder_filters_streaming = True
    encoder_filters_streaming = True
    decoder_above_high_watermark = False
    encoder_above_high_watermark = False
    # Stream state (FilterManager::State).
    remote_decode_complete = False
    local_complete = False  # the response left the encoder chain completely
    remote_encode_complete = False
    non_100_response_headers_encoded = False
    destroyed = False
    saw_downstream_reset = False
    is_head_request = False
    is_grpc_request = False
    # HttpConnectionManager.proxy_100_continue: forward upstream 1xx instead of answering itself.
    proxy_100_continue = False
    # False: the owner has no request timeout, so its disarm_request_timeout() is not called.
    request_timeout_armed = True
    decoder_filter_chain_aborted = False
    encoder_filter_chain_aborted = False
    _filter_call_state = 0
    _prepared_local_reply: Callable[[], None] | None = None
    _filters_destroyed = False
    _logged = False

    def __init__(
        self,
        callbacks: FilterManagerCallbacks,
        dispatcher: "Dispatcher",
        stream_info: "StreamInfo",
        stream_id: int,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        self.callbacks = callbacks
        self.dispatcher = dispatcher
        self.stream_info = stream_info
        self.stream_id = stream_id
        self.buffer_limit = buffer_limit
        self.decoder_filters: list[ActiveStreamDecoderFilter] = []
        self.encoder_filters: list[ActiveStreamEncoderFilter] = []  # in encode order (reversed)
        self._destroy_order: list[Any] = []
        self.access_log_handlers: list[AccessLogHandler] = []

    # -- FilterChainFactoryCallbacks -----------------------------------------------------

    def add_stream_decoder_filter(self, f: StreamDecoderFilter) -> None:
        active = ActiveStreamDecoderFilter(self, f)
        f.set_decoder_filter_callbacks(active)
        self.decoder_filters.append(active)
        self._destroy_order.append(f)

    def add_stream_encoder_filter(self, f: StreamEncoderFilter) -> None:
        active = ActiveStreamEncoderFilter(self, f)
        f.set_encoder_filter_callbacks(active)
        self.encoder_filters.insert(0, active)
        self._destroy_order.append(f)

    def add_stream_filter(self, f: Any) -> None:
        decoder = ActiveStreamDecoderFilter(self, f)
        encoder = ActiveStreamEncoderFilter(self, f)
        f.set_decoder_filter_callbacks(decoder)
        f.set_encoder_filter_callbacks(encoder)
        self.decoder_filters.append(decoder)
        self.encoder_filters.insert(0, encoder)
        self._destroy_order.append(f)

    def add_access_log_handler(self, h: AccessLogHandler) -> None:
        self.access_log_handlers.append(h)

    # -- decoding ------------------------------------------------------------------------

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        """Request headers from the codec (after the connection manager's own checks)."""
        self.request_headers = headers
        self.is_head_request = headers.get(":method") == "HEAD"
        self.is_grpc_request = (headers.get("content-type") or "").startswith("application/grpc")
        if end_stream:
            self.remote_decode_complete = True
        self.decode_headers_from(None, headers, end_stream)

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.remote_decode_complete = True
        self.decode_data_from(None, bytearray(data), end_stream, start_from_current=False)

    def decode_trailers(self, trailers: HeaderMap) -> None:
        self.request_trailers = trailers
        self.remote_decode_complete = True
        self.decode_trailers_from(None, trailers)

    def _decode_start(self, filter: ActiveStreamDecoderFilter | None, start_from_current: bool) -> int:
        if filter is None:
            return 0
        i = self.decoder_filters.index(filter)
        return i if start_from_current and filter.iterate_from_current_filter else i + 1

    def decode_headers_from(
        self, filter: ActiveStreamDecoderFilter | None, headers: HeaderMap, end_stream: bool
    ) -> None:
        filters = self.decoder_filters
        i = 0 if filter is None else self._decode_start(filter, False)
        continue_data_entry: ActiveStreamDecoderFilter | None = None
        while i < len(filters):
            entry = filters[i]
            entry.end_stream = end_stream and continue_data_entry is None
            self._filter_call_state |= _DECODE_HEADERS
            status = entry.handle.decode_headers(headers, entry.end_stream)
            self._filter_call_state &= ~_DECODE_HEADERS
            entry.processed_headers = True
            if self.decoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            if status is _HEADERS_CONTINUE:  # handle_after_headers(status), inline for the common case
                entry.headers_continued = True
                continue_iteration = entry.iteration_state is _CONTINUE
            elif status is _HEADERS_STOP:  # handle_after_headers(status), inline: the router stops here
                entry.iteration_state = _STOP_SINGLE
                continue_iteration = False
            else:
                if status == _HEADERS_CONTINUE_NO_END:
                    # The filter will inject a body: later filters must not see end_stream on headers.
                    end_stream = False
                continue_iteration = entry.handle_after_headers(status)
            if self.local_complete and i + 1 < len(filters):
                self._maybe_continue_decoding(continue_data_entry)
                return
            if not continue_iteration and i + 1 < len(filters):
                # Stop unless this is the last (terminal) filter, which may want to buffer
                # the body an earlier filter added.
                self._maybe_continue_decoding(continue_data_entry)
                return
            if end_stream and self.buffered_request_data is not None and continue_data_entry is None:
                continue_data_entry = entry
            i += 1
        if continue_data_entry is not None:
            self._maybe_continue_decoding(continue_data_entry)
        if end_stream and self.request_timeout_armed:
            self.callbacks.disarm_request_timeout()

    def _maybe_continue_decoding(self, entry: ActiveStreamDecoderFilter | None) -> None:
        if entry is not None:
            # As Envoy: fake a single stop so that commonContinue skips re-running headers.
            entry.iteration_state = IterationState.StopSingleIteration
            entry.common_continue()

    def decode_data_from(
        self, filter: ActiveStreamDecoderFilter | None, data: bytearray, end_stream: bool, start_from_current: bool
    ) -> None:
        if self.local_complete or self.destroyed:
            return  # the response is done: filters do not care about more request body
        filters = self.decoder_filters
        trailers_existed = self.request_trailers is not None
        trailers_added_entry: ActiveStreamDecoderFilter | None = None
        i = 0 if filter is None else self._decode_start(filter, start_from_current)
        while i < len(filters):
            entry = filters[i]
            state = entry.iteration_state
            if state is _STOP_ALL_BUFFER or state is _STOP_ALL_WATERMARK:  # entry.stopped_all()
                self.decoder_filters_streaming = state is _STOP_ALL_WATERMARK
                entry.buffer_data(data)
                return
            if entry.end_stream:
                return  # data after end_stream is not for this filter and later ones
            entry.end_stream = end_stream and self.request_trailers is None
            self._filter_call_state |= _DECODE_DATA
            status = entry.handle.decode_data(data, entry.end_stream)
            self._filter_call_state &= ~_DECODE_DATA
            if self.decoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            if not trailers_existed and self.request_trailers is not None and trailers_added_entry is None:
                trailers_added_entry = entry
            last = i + 1 == len(filters)
            if last and status not in _BUFFERING_DATA_STATUSES:
                # The terminal filter consumed the data (Envoy's router drains what it forwards),
                # so a later continue cannot hand the same bytes over twice.
                data.clear()
            # handle_after_data, unless a Continue that iteration follows (the common case).
            if (status != _DATA_CONTINUE or entry.iteration_state is _STOP_SINGLE) and (
                    not entry.handle_after_data(status, data) and not last):
                break
            i += 1
        if data is self.buffered_request_data:
            self._check_decoder_low_watermark(data)
        if trailers_added_entry is not None and self.request_trailers is not None:
            self.decode_trailers_from(trailers_added_entry, self.request_trailers)
        if end_stream and self.request_timeout_armed:
            self.callbacks.disarm_request_timeout()

    def _check_decoder_low_watermark(self, buf: bytearray) -> None:
        """The request buffer's low watermark (half the limit, as Envoy's WatermarkBuffer)."""
        if self.decoder_above_high_watermark and len(buf) < self.buffer_limit // 2:
            self.decoder_above_high_watermark = False
            self.callbacks.on_decoder_filter_below_write_buffer_low_watermark()

    def decode_trailers_from(self, filter: ActiveStreamDecoderFilter | None, trailers: HeaderMap) -> None:
        if self.local_complete or self.destroyed:
            return
        filters = self.decoder_filters
        i = self._decode_start(filter, True)
        while i < len(filters):
            entry = filters[i]
            if entry.stopped_all():
                return
            self._filter_call_state |= _DECODE_TRAILERS
            status = entry.handle.decode_trailers(trailers)
            self._filter_call_state &= ~_DECODE_TRAILERS
            entry.end_stream = True
            if self.decoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            if not entry.handle_after_trailers(status):
                return
            i += 1
        if self.request_timeout_armed:
            self.callbacks.disarm_request_timeout()

    def add_decoded_data(self, filter: ActiveStreamDecoderFilter, data: bytes | bytearray, streaming: bool) -> None:
        state = self._filter_call_state
        if state == 0 or state & (_DECODE_HEADERS | _DECODE_DATA) or (
            state & _DECODE_TRAILERS and not filter.can_iterate()
        ):
            self.decoder_filters_streaming = streaming
            filter.buffer_data(_movable(data))
        elif state & _DECODE_TRAILERS:
            self.decode_data_from(filter, bytearray(data), False, start_from_current=False)
        else:
            self.send_local_reply(502, "Filter error", None, None, "filter_added_invalid_request_data")

    def add_decoded_trailers(self) -> HeaderMap:
        """Only valid from decode_data with end_stream (Envoy asserts the same)."""
        assert self.request_trailers is None, "request trailers already exist"
        self.request_trailers = HeaderMap()
        return self.request_trailers

    # -- encoding ------------------------------------------------------------------------

    def _encode_start(self, filter: ActiveStreamEncoderFilter | None, start_from_current: bool) -> int:
        if filter is None:
            return 0
        i = self.encoder_filters.index(filter)
        return i if start_from_current and filter.iterate_from_current_filter else i + 1

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        if not self.proxy_100_continue:
            return  # the connection manager already answered 100-continue itself (Envoy's default)
        for entry in self.encoder_filters:
            status = entry.handle.encode_1xx_headers(headers)
            if status != FilterHeadersStatus.Continue:
                return  # Envoy: 1xx continue from a stopped filter is not supported; it is dropped
        self.callbacks.encode_1xx_headers(headers)

    def encode_headers_from(
        self, filter: ActiveStreamEncoderFilter | None, headers: HeaderMap, end_stream: bool
    ) -> None:
        if self.request_timeout_armed:
            self.callbacks.disarm_request_timeout()
        filters = self.encoder_filters
        i = 0 if filter is None else self._encode_start(filter, False)
        continue_data_entry: ActiveStreamEncoderFilter | None = None
        if filter is None:
            self.local_complete = end_stream  # Envoy's commonEncodePrefix
        while i < len(filters):
            entry = filters[i]
            entry.end_stream = end_stream and continue_data_entry is None
            self._filter_call_state |= _ENCODE_HEADERS
            status = entry.handle.encode_headers(headers, entry.end_stream)
            self._filter_call_state &= ~_ENCODE_HEADERS
            if self.encoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            entry.processed_headers = True
            if status is _HEADERS_CONTINUE:  # handle_after_headers(status), inline for the common case
                entry.headers_continued = True
                continue_iteration = entry.iteration_state is _CONTINUE
            else:
                if status == _HEADERS_CONTINUE_NO_END:
                    end_stream = False
                continue_iteration = entry.handle_after_headers(status)
            if not continue_iteration:
                if not entry.end_stream:
                    self._maybe_continue_encoding(continue_data_entry)
                return
            if end_stream and self.buffered_response_data is not None and continue_data_entry is None:
                continue_data_entry = entry
            i += 1
        modified_end_stream = end_stream and continue_data_entry is None
        self.non_100_response_headers_encoded = True
        self.callbacks.encode_headers(headers, modified_end_stream)
        if self.saw_downstream_reset:
            return
        if modified_end_stream:
            self._maybe_end_encode(True)
        elif continue_data_entry is not None:
            self._maybe_continue_encoding(continue_data_entry)

    def _maybe_continue_encoding(self, entry: ActiveStreamEncoderFilter | None) -> None:
        if entry is not None:
            entry.iteration_state = IterationState.StopSingleIteration
            entry.common_continue()

    def encode_data_from(
        self, filter: ActiveStreamEncoderFilter | None, data: bytearray, end_stream: bool, start_from_current: bool
    ) -> None:
        if self.remote_encode_complete or self.destroyed:
            return
        if filter is None:
            self.local_complete = end_stream
        filters = self.encoder_filters
        trailers_existed = self.response_trailers is not None
        trailers_added_entry: ActiveStreamEncoderFilter | None = None
        i = 0 if filter is None else self._encode_start(filter, start_from_current)
        while i < len(filters):
            entry = filters[i]
            state = entry.iteration_state
            if state is _STOP_ALL_BUFFER or state is _STOP_ALL_WATERMARK:  # entry.stopped_all()
                self.encoder_filters_streaming = state is _STOP_ALL_WATERMARK
                entry.buffer_data(data)
                return
            if entry.end_stream:
                return
            entry.end_stream = end_stream and self.response_trailers is None
            self._filter_call_state |= _ENCODE_DATA
            status = entry.handle.encode_data(data, entry.end_stream)
            self._filter_call_state &= ~_ENCODE_DATA
            if self.encoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            if not trailers_existed and self.response_trailers is not None and trailers_added_entry is None:
                trailers_added_entry = entry
            # handle_after_data, unless a Continue that iteration follows (the common case).
            if (status != _DATA_CONTINUE or entry.iteration_state is _STOP_SINGLE) and (
                    not entry.handle_after_data(status, data)):
                return
            i += 1
        modified_end_stream = end_stream and trailers_added_entry is None
        out = bytes(data)
        data.clear()
        if data is self.buffered_response_data and self.encoder_above_high_watermark:
            self.encoder_above_high_watermark = False
            self.callbacks.on_encoder_filter_below_write_buffer_low_watermark()
        self.callbacks.encode_data(out, modified_end_stream)
        if self.saw_downstream_reset:
            return
        if modified_end_stream and not self.remote_encode_complete:  # _maybe_end_encode(True), inline
            self.remote_encode_complete = True
            self.callbacks.end_stream()
        if trailers_added_entry is not None and self.response_trailers is not None:
            self.encode_trailers_from(trailers_added_entry, self.response_trailers)

    def encode_trailers_from(self, filter: ActiveStreamEncoderFilter | None, trailers: HeaderMap) -> None:
        if self.remote_encode_complete or self.destroyed:
            return
        self.local_complete = True
        filters = self.encoder_filters
        i = self._encode_start(filter, True)
        while i < len(filters):
            entry = filters[i]
            if entry.stopped_all():
                return
            self._filter_call_state |= _ENCODE_TRAILERS
            status = entry.handle.encode_trailers(trailers)
            self._filter_call_state &= ~_ENCODE_TRAILERS
            entry.end_stream = True
            if self.encoder_filter_chain_aborted:
                self._execute_prepared_local_reply()
                return
            if not entry.handle_after_trailers(status):
                return
            i += 1
        self.callbacks.encode_trailers(trailers)
        if self.saw_downstream_reset:
            return
        self._maybe_end_encode(True)

    def add_encoded_data(self, filter: ActiveStreamEncoderFilter, data: bytes | bytearray, streaming: bool) -> None:
        state = self._filter_call_state
        if state == 0 or state & (_ENCODE_HEADERS | _ENCODE_DATA) or (
            state & _ENCODE_TRAILERS and not filter.can_iterate()
        ):
            self.encoder_filters_streaming = streaming
            filter.buffer_data(_movable(data))
        elif state & _ENCODE_TRAILERS:
            self.encode_data_from(filter, bytearray(data), False, start_from_current=False)
        else:
            self.send_local_reply(502, "Filter error", None, None, "filter_added_invalid_response_data")

    def add_encoded_trailers(self) -> HeaderMap:
        assert self.response_trailers is None, "response trailers already exist"
        self.response_trailers = HeaderMap()
        return self.response_trailers

    def _maybe_end_encode(self, end_stream: bool) -> None:
        if end_stream and not self.remote_encode_complete:
            self.remote_encode_complete = True
            self.callbacks.end_stream()

    # -- local replies and resets --------------------------------------------------------

    def send_local_reply(
        self,
        status: int,
        body: bytes | str,
        modify_headers: Callable[[HeaderMap], None] | None = None,
        grpc_status: int | None = None,
        details: str = "",
    ) -> None:
        """Envoy's FilterManager::sendLocalReply (see the module docstring for the three cases)."""
        if self.destroyed or self.remote_encode_complete:
            return
        on_local_reply = getattr(self.callbacks, "on_local_reply", None)
        if on_local_reply is not None:
            on_local_reply(status)
        if self._filter_call_state & _IS_DECODING:
            self.decoder_filter_chain_aborted = True
        elif self._filter_call_state & _IS_ENCODING:
            self.encoder_filter_chain_aborted = True
        self.stream_info.response_code_details = details
        body_bytes = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        if self.response_headers is None:
            # Nothing of the response has started: send it through the encoder filters.
            def reply() -> None:
                self._send_local_reply_via_filter_chain(status, body_bytes, modify_headers, grpc_status)

            if self._filter_call_state & _IS_DECODING:
                # Envoy prepares the reply and runs it once the current decoder callback returns
                # (the first one prepared wins).
                if self._prepared_local_reply is None:
                    self._prepared_local_reply = reply
            else:
                reply()
        elif not self.non_100_response_headers_encoded:
            # Headers are inside the encoder chain: bypass the filters to keep their state sane.
            self._send_direct_local_reply(status, body_bytes, modify_headers, grpc_status)
        else:
            # Response headers already went downstream: all that is left is a reset.
            self.reset_stream()

    def _execute_prepared_local_reply(self) -> None:
        reply, self._prepared_local_reply = self._prepared_local_reply, None
        if reply is not None:
            reply()

    def _local_reply_headers(
        self,
        status: int,
        body: bytes,
        modify_headers: Callable[[HeaderMap], None] | None,
        grpc_status: int | None,
    ) -> tuple[HeaderMap, bytes]:
        """Http::Utility::sendLocalReply's response: text/plain body, or a gRPC trailers-only reply."""
        if self.is_grpc_request:
            headers = HeaderMap([(":status", "200"), ("content-type", "application/grpc")])
            code = grpc_status if grpc_status is not None else _HTTP_TO_GRPC.get(status, 2)
            headers.add("grpc-status", str(code))
            if body:
                headers.add("grpc-message", _percent_encode_grpc_message(body))
            body = b""
        else:
            headers = HeaderMap([(":status", str(status))])
            if body:
                headers.add("content-length", str(len(body)))
                headers.add("content-type", "text/plain")
        # A route that forwards to a cluster adds its response headers to every local reply
        # (the filter manager's sendLocalReply does it, before the caller's modify_headers).
        resolved_route = getattr(self.callbacks, "resolved_route", None)
        route = resolved_route() if resolved_route is not None else None
        if getattr(route, "action", "") == "route":
            route.finalize_response_headers(headers, self.stream_info, self.request_headers)
        if modify_headers is not None:
            modify_headers(headers)
        self.stream_info.response_code = int(headers.get(":status") or status)
        return headers, body

    def _send_local_reply_via_filter_chain(
        self, status: int, body: bytes, modify_headers: Callable[[HeaderMap], None] | None, grpc_status: int | None
    ) -> None:
        self.callbacks.create_filter_chain()
        headers, body = self._local_reply_headers(status, body, modify_headers, grpc_status)
        self.response_headers = headers
        end_stream = not body or self.is_head_request
        self.encode_headers_from(None, headers, end_stream)
        if not end_stream and not self.destroyed and not self.saw_downstream_reset:
            self.encode_data_from(None, bytearray(body), True, start_from_current=False)

    def _send_direct_local_reply(
        self, status: int, body: bytes, modify_headers: Callable[[HeaderMap], None] | None, grpc_status: int | None
    ) -> None:
        self.encoder_filters_streaming = True
        headers, body = self._local_reply_headers(status, body, modify_headers, grpc_status)
        self.response_headers = headers
        end_stream = not body or self.is_head_request
        self.non_100_response_headers_encoded = True
        self.local_complete = True
        self.callbacks.encode_headers(headers, end_stream)
        if self.saw_downstream_reset:
            return
        self._maybe_end_encode(end_stream)
        if not end_stream:
            self.callbacks.encode_data(body, True)
            if not self.saw_downstream_reset:
                self._maybe_end_encode(True)

    def reset_stream(self) -> None:
        """Abort the stream (a filter's reset_stream, or a local reply too late to send)."""
        if self.saw_downstream_reset or self.destroyed:
            return
        self.saw_downstream_reset = True
        self.local_complete = True
        self.callbacks.reset_stream()

    # -- completion ----------------------------------------------------------------------

    def log(self) -> None:
        """Run every access log handler once (Envoy: before the filters are destroyed)."""
        if self._logged:
            return
        self._logged = True
        for handler in self.access_log_handlers:
            handler.log(self.request_headers, self.response_headers, self.response_trailers, self.stream_info)

    def destroy_filters(self) -> None:
        """on_destroy for every filter, once, in the order they were added."""
        if self._filters_destroyed:
            return
        self._filters_destroyed = True
        self.destroyed = True
        for f in self._destroy_order:
            f.on_destroy()

    def release(self) -> None:
        """The owner is done with this stream for good (Envoy deletes it): drop the filter chain.

        That breaks the cycles this manager <-> its active filters <-> the filters (which hold
        their callbacks), so the stream's objects are freed when their last reference goes
        instead of by the cyclic gc. Only after destroy_filters(), and from outside any of this
        stream's calls (the connection manager does it from its next fresh event): a filter
        called later reaches no other filter."""
        assert self._filters_destroyed, "release() before destroy_filters()"
        for entry in self.decoder_filters:
            entry.handle = None
        for entry in self.encoder_filters:
            entry.handle = None
        self._destroy_order = self.decoder_filters = self.encoder_filters = _NO_FILTERS  # type: ignore[assignment]
        # A filter may be an access log handler too (the Wasm filter is).
        self.access_log_handlers = _NO_FILTERS  # type: ignore[assignment]


_NO_FILTERS: tuple[Any, ...] = ()


def _movable(data: bytes | bytearray) -> bytearray:
    """add_*_data moves the bytes, as Envoy's Buffer::move: a bytearray given (e.g. the chunk a
    filter is looking at in decode_data) is emptied, so returning Stop*AndBuffer after adding it
    does not buffer it twice."""
    return data if isinstance(data, bytearray) else bytearray(data)


def _percent_encode_grpc_message(message: bytes) -> str:
    """gRPC's percent-encoding for grpc-message (Grpc::Common::PercentEncoding)."""
    out = []
    for ch in message:
        if ch < 0x20 or ch > 0x7E or ch == 0x25:
            out.append("%%%02X" % ch)
        else:
            out.append(chr(ch))
    return "".join(out)
