"""envoy.filters.http.wasm: a Proxy-Wasm plugin as an HTTP filter (the bridge).

Envoy's wasm FilterConfig + Context-as-filter (source/extensions/filters/http/wasm/,
source/extensions/common/wasm/context.cc). `create_wasm_filter_factory` (main thread) builds
the `PluginConfig` (code, base VM, canary, per-thread clones); its factory runs per stream on
the stream's worker and installs one `WasmFilter` as decoder, encoder and access-log handler,
or nothing when the plugin is FAIL_OPEN and its VM is dead.

A WasmFilter is the stream context's `StreamEnvironment`: the host core calls it to continue
or reset the stream, send a local reply, add trailers and clear the route cache; the filter
calls the stream context for every filter callback. Envoy's conventions kept here:

* body callbacks see the *buffered* body once the plugin asked to buffer
  (StopIterationAndBuffer): the chunk joins the decoding/encoding buffer first and the
  plugin gets the whole of it (sizes 3,6,9 for three 3-byte chunks, as Envoy 1.40);
* headers StopIteration becomes StopAllIterationAndWatermark unless
  ``allow_on_headers_stop_iteration`` (the host core does this);
* proxy_on_log runs in the access-log phase; proxy_on_done and proxy_on_delete when the
  stream is destroyed.

Worker thread only (the stream's dispatcher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..http.filter import (
    FilterChainFactoryCallbacks,
    FilterDataStatus,
    FilterFactoryCb,
    FilterHeadersStatus,
    FilterTrailersStatus,
    StreamDecoderFilterCallbacks,
    StreamEncoderFilterCallbacks,
)
from ..http.headers import HeaderMap
from .abi import WasmHeaderMapType, WasmStreamType
from .context import ContextBase, StreamEnvironment
from .plugin import PluginConfig

if TYPE_CHECKING:
    from ..http.stream_info import StreamInfo
    from ..server_context import FactoryContext

__all__ = ["WasmFilter", "create_wasm_filter_factory"]


class WasmFilter(StreamEnvironment):
    """One HTTP stream's filter over its stream context."""

    __slots__ = ("context", "decoder_callbacks", "encoder_callbacks")

    def __init__(self) -> None:
        self.context: ContextBase | None = None
        self.decoder_callbacks: StreamDecoderFilterCallbacks | None = None
        self.encoder_callbacks: StreamEncoderFilterCallbacks | None = None

    # -- StreamEnvironment (called by the host core) ----------------------------------------

    @property  # type: ignore[override]
    def stream_info(self) -> "StreamInfo | None":
        callbacks = self.decoder_callbacks or self.encoder_callbacks
        return callbacks.stream_info if callbacks is not None else None

    def continue_stream(self, stream_type: WasmStreamType) -> None:
        if stream_type == WasmStreamType.Request and self.decoder_callbacks is not None:
            self.decoder_callbacks.continue_decoding()
        elif stream_type == WasmStreamType.Response and self.encoder_callbacks is not None:
            self.encoder_callbacks.continue_encoding()

    def close_stream(self, stream_type: WasmStreamType) -> None:
        if stream_type == WasmStreamType.Request and self.decoder_callbacks is not None:
            self.decoder_callbacks.reset_stream()
        elif stream_type == WasmStreamType.Response and self.encoder_callbacks is not None:
            self.encoder_callbacks.reset_stream()

    def send_local_response(
        self, code: int, body: bytes, headers: list[tuple[str, str]], grpc_status: int | None, details: str
    ) -> None:
        callbacks = self.decoder_callbacks or self.encoder_callbacks
        if callbacks is None:
            return

        def modify_headers(response_headers: HeaderMap) -> None:
            for key, value in headers:
                response_headers.add(key, value)

        callbacks.send_local_reply(code, body, modify_headers if headers else None, grpc_status, details)

    def clear_route_cache(self) -> None:
        if self.decoder_callbacks is not None:
            self.decoder_callbacks.clear_route_cache()

    def add_trailers(self, map_type: WasmHeaderMapType) -> HeaderMap | None:
        if map_type == WasmHeaderMapType.RequestTrailers and self.decoder_callbacks is not None:
            return self.decoder_callbacks.add_decoded_trailers()
        if map_type == WasmHeaderMapType.ResponseTrailers and self.encoder_callbacks is not None:
            return self.encoder_callbacks.add_encoded_trailers()
        return None

    # -- the HTTP filter API (called by the filter manager) ---------------------------------

    def set_decoder_filter_callbacks(self, callbacks: StreamDecoderFilterCallbacks) -> None:
        self.decoder_callbacks = callbacks

    def set_encoder_filter_callbacks(self, callbacks: StreamEncoderFilterCallbacks) -> None:
        self.encoder_callbacks = callbacks

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        assert self.context is not None
        return self.context.decode_headers(headers, end_stream)

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        context = self.context
        assert context is not None
        if context.buffering_request_body and self.decoder_callbacks is not None:
            buffered = self.decoder_callbacks.decoding_buffer()
            if buffered is not None and buffered is not data:
                # Envoy hands the plugin the body buffered so far, this chunk included.
                buffered += data
                data.clear()
                return context.decode_data(buffered, end_stream)
        return context.decode_data(data, end_stream)

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        assert self.context is not None
        return self.context.decode_trailers(trailers)

    def encode_1xx_headers(self, headers: HeaderMap) -> FilterHeadersStatus:
        return FilterHeadersStatus.Continue

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        assert self.context is not None
        return self.context.encode_headers(headers, end_stream)

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        context = self.context
        assert context is not None
        if context.buffering_response_body and self.encoder_callbacks is not None:
            buffered = self.encoder_callbacks.encoding_buffer()
            if buffered is not None and buffered is not data:
                buffered += data
                data.clear()
                return context.encode_data(buffered, end_stream)
        return context.encode_data(data, end_stream)

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        assert self.context is not None
        return self.context.encode_trailers(trailers)

    def log(
        self,
        request_headers: HeaderMap | None,
        response_headers: HeaderMap | None,
        response_trailers: HeaderMap | None,
        stream_info: "StreamInfo",
    ) -> None:
        if self.context is not None:
            self.context.log(request_headers, response_headers, response_trailers, stream_info)

    def on_destroy(self) -> None:
        context = self.context
        if context is not None:
            context.on_destroy()
            # The stream is over: break the filter <-> context cycle so both go at once.
            context.env = None


def create_wasm_filter_factory(proto: Any, context: "FactoryContext") -> FilterFactoryCb:
    """Main thread: envoy.extensions.filters.http.wasm.v3.Wasm -> a per-stream filter factory.

    Raises ConfigError when the plugin cannot be loaded ("Unable to create Wasm plugin <name>").
    """
    config = PluginConfig(proto.config, context)

    def factory(callbacks: FilterChainFactoryCallbacks) -> None:
        wasm_filter = WasmFilter()
        stream_context = config.create_context(wasm_filter)
        if stream_context is None:  # FAIL_OPEN and no VM: the stream runs without the plugin
            return
        wasm_filter.context = stream_context
        callbacks.add_stream_filter(wasm_filter)
        callbacks.add_access_log_handler(wasm_filter)

    return factory
