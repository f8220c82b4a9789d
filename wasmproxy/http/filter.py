"""The HTTP filter API: Envoy's StreamDecoderFilter / StreamEncoderFilter, in Python.

This is the contract between the connection manager (which owns the filter chain
and drives it) and every filter: the router, the Wasm filter, test filters.
Statuses and callbacks mean exactly what they mean in Envoy
(envoy/http/filter.h); read that header when in doubt.

Threading: a filter lives on the worker that owns its stream and every call to
it, and every callback it makes, happens on that worker's dispatcher.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable, Protocol

from .headers import HeaderMap

if TYPE_CHECKING:
    from ..event.dispatcher import Dispatcher
    from .stream_info import StreamInfo


class FilterHeadersStatus(enum.IntEnum):
    """What a filter returns from decode_headers / encode_headers (envoy/http/filter.h)."""

    Continue = 0
    # Stop iterating over later filters; data and trailers still reach this filter.
    StopIteration = 1
    # Continue, but the headers are no longer the end of the stream (a body will be added).
    ContinueAndDontEndStream = 2
    # Stop, and buffer all data and trailers until continue_*() (no watermark: 413/500 on overflow).
    StopAllIterationAndBuffer = 3
    # Stop, and buffer with flow control (read disabled above the high watermark).
    StopAllIterationAndWatermark = 4


class FilterDataStatus(enum.IntEnum):
    Continue = 0
    # Buffer this data and stop; data keeps being added to the buffer and this filter sees it again.
    StopIterationAndBuffer = 1
    # Same, with flow control instead of a hard limit.
    StopIterationAndWatermark = 2
    # Stop; this chunk is not buffered (the filter took it or dropped it).
    StopIterationNoBuffer = 3


class FilterTrailersStatus(enum.IntEnum):
    Continue = 0
    StopIteration = 1


class StreamFilterCallbacks(Protocol):
    """Callbacks common to decoder and encoder filters."""

    @property
    def dispatcher(self) -> "Dispatcher": ...

    @property
    def stream_info(self) -> "StreamInfo": ...

    @property
    def stream_id(self) -> int: ...

    def route(self) -> object | None:
        """The route selected for this stream (router.RouteEntry), computing it if needed."""

    def clear_route_cache(self) -> None: ...

    def reset_stream(self) -> None:
        """Reset the downstream stream (no response is sent)."""

    def send_local_reply(
        self,
        status: int,
        body: bytes | str,
        modify_headers: Callable[[HeaderMap], None] | None = None,
        grpc_status: int | None = None,
        details: str = "",
    ) -> None:
        """Stop the chain and answer the client directly, as Envoy's sendLocalReply."""


class StreamDecoderFilterCallbacks(StreamFilterCallbacks, Protocol):
    def continue_decoding(self) -> None:
        """Resume request iteration after a Stop* status (from any later event on this dispatcher)."""

    def decoding_buffer(self) -> bytearray | None:
        """The request data buffered so far for this filter (None when nothing is buffered)."""

    def add_decoded_data(self, data: bytes, streaming: bool) -> None: ...

    def add_decoded_trailers(self) -> HeaderMap:
        """Add trailers to a request that had none (only from decode_data with end_stream)."""

    @property
    def request_headers(self) -> HeaderMap | None: ...

    @property
    def request_trailers(self) -> HeaderMap | None: ...

    # Used by the terminal (router) filter to send the upstream response downstream
    # through the encoder filter chain.
    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...

    def encode_data(self, data: bytes, end_stream: bool) -> None: ...

    def encode_trailers(self, trailers: HeaderMap) -> None: ...

    def encode_1xx_headers(self, headers: HeaderMap) -> None: ...

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None: ...

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None: ...


class StreamEncoderFilterCallbacks(StreamFilterCallbacks, Protocol):
    def continue_encoding(self) -> None: ...

    def encoding_buffer(self) -> bytearray | None: ...

    def add_encoded_data(self, data: bytes, streaming: bool) -> None: ...

    def add_encoded_trailers(self) -> HeaderMap: ...

    @property
    def response_headers(self) -> HeaderMap | None: ...

    @property
    def response_trailers(self) -> HeaderMap | None: ...


class StreamDecoderFilter(Protocol):
    def set_decoder_filter_callbacks(self, callbacks: StreamDecoderFilterCallbacks) -> None: ...

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus: ...

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        """`data` may be modified in place (it is the chunk, or the whole buffer when buffering)."""

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus: ...

    def on_destroy(self) -> None: ...


class StreamEncoderFilter(Protocol):
    def set_encoder_filter_callbacks(self, callbacks: StreamEncoderFilterCallbacks) -> None: ...

    def encode_1xx_headers(self, headers: HeaderMap) -> FilterHeadersStatus: ...

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus: ...

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus: ...

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus: ...

    def on_destroy(self) -> None: ...


class AccessLogHandler(Protocol):
    def log(
        self,
        request_headers: HeaderMap | None,
        response_headers: HeaderMap | None,
        response_trailers: HeaderMap | None,
        stream_info: "StreamInfo",
    ) -> None:
        """Called once when the stream completes (Wasm: proxy_on_log)."""


class FilterChainFactoryCallbacks(Protocol):
    """What a filter factory uses to install filters on a new stream (Envoy's FilterChainFactoryCallbacks)."""

    def add_stream_decoder_filter(self, f: StreamDecoderFilter) -> None: ...

    def add_stream_encoder_filter(self, f: StreamEncoderFilter) -> None: ...

    def add_stream_filter(self, f: object) -> None:
        """A filter that is both decoder and encoder (decode order: chain order; encode: reverse)."""

    def add_access_log_handler(self, h: AccessLogHandler) -> None: ...


# A per-worker filter factory: called once per stream on the owning worker.
FilterFactoryCb = Callable[[FilterChainFactoryCallbacks], None]


class PassThroughFilter:
    """A decoder+encoder filter that continues everywhere; subclass and override what you need."""

    decoder_callbacks: StreamDecoderFilterCallbacks
    encoder_callbacks: StreamEncoderFilterCallbacks

    def set_decoder_filter_callbacks(self, callbacks: StreamDecoderFilterCallbacks) -> None:
        self.decoder_callbacks = callbacks

    def set_encoder_filter_callbacks(self, callbacks: StreamEncoderFilterCallbacks) -> None:
        self.encoder_callbacks = callbacks

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return FilterHeadersStatus.Continue

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.Continue

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.Continue

    def encode_1xx_headers(self, headers: HeaderMap) -> FilterHeadersStatus:
        return FilterHeadersStatus.Continue

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return FilterHeadersStatus.Continue

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.Continue

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.Continue

    def on_destroy(self) -> None:
        pass
