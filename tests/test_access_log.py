"""Access log formatting, pinned to lines real Envoy 1.40 printed for the same requests."""

from __future__ import annotations

import calendar
import os
import time

import pytest

from wasmproxy.http.access_log import DEFAULT_FORMAT, AccessLogger, Formatter, FormatError, create_access_logger
from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo


def info(**kw) -> StreamInfo:
    si = StreamInfo(ConnectionInfo(3, Address("127.0.0.1", 10000), Address("10.0.0.7", 40000)),
                    start_time=calendar.timegm((2026, 11, 27, 7, 34, 38)) + 0.726, start_monotonic=100.0)
    for k, v in kw.items():
        setattr(si, k, v)
    return si


def req(**extra: str) -> HeaderMap:
    h = HeaderMap([(":method", "GET"), (":path", "/direct"), (":authority", "a"), (":scheme", "http")])
    for k, v in extra.items():
        h.add(k.replace("_", "-"), v)
    return h


def test_default_format_matches_envoy_for_a_direct_response():
    line = Formatter(DEFAULT_FORMAT).format((
        req(x_request_id="aba3ceb3-285c-4aff-8861-334978ee1848"), HeaderMap([(":status", "200")]), None,
        info(response_code=200, bytes_sent=5, last_downstream_tx=100.0),
    ))
    assert line == ('[2026-11-27T07:34:38.726Z] "GET /direct HTTP/1.1" 200 - 0 5 0 - "-" "-" '
                    '"aba3ceb3-285c-4aff-8861-334978ee1848" "a" "-"\n')


def test_default_format_for_a_codec_error_without_request_headers():
    line = Formatter(DEFAULT_FORMAT).format((
        None, HeaderMap([(":status", "431")]), None,
        info(response_code=431, response_flags=["DPE"], bytes_sent=31, last_downstream_tx=100.0)))
    assert line.endswith('] "- - HTTP/1.1" 431 DPE 0 31 0 - "-" "-" "-" "-" "-"\n')


def test_proxied_request_shows_upstream_host_and_service_time():
    line = Formatter(DEFAULT_FORMAT).format((
        req(x_forwarded_for="1.2.3.4", user_agent="curl/8"),
        HeaderMap([(":status", "200"), ("x-envoy-upstream-service-time", "1")]), None,
        info(response_code=200, bytes_sent=2, last_downstream_tx=100.001, upstream_host=Address("127.0.0.1", 28432)),
    ))
    assert line.endswith(' 200 - 0 2 1 1 "1.2.3.4" "curl/8" "-" "a" "127.0.0.1:28432"\n')


def test_original_path_alternative_and_truncation_and_percent():
    f = Formatter("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:PATH):3% 100%% %RESPONSE_CODE_DETAILS%")
    assert f.format((req(x_envoy_original_path="/orig"), None, None, info())) == "/orig /di 100% -"


def test_custom_operators():
    f = Formatter("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_ADDRESS% "
                  "%CONNECTION_ID% %START_TIME(%Y/%m/%d %H:%M:%E3S)% %DYNAMIC_METADATA(ns:k)% %FILTER_STATE(fs)%")
    si = info(dynamic_metadata={"ns": {"k": "v"}}, filter_state={"fs": b"x"})
    assert f.format((None, None, None, si)) == (
        "10.0.0.7:40000 10.0.0.7 127.0.0.1:10000 3 2026/11/27 07:34:38.726 v x")


@pytest.mark.parametrize("bad", ["%NOT_A_THING%", "%REQ()%", "%PROTOCOL(x)%", "50% off"])
def test_unsupported_commands_are_rejected(bad):
    with pytest.raises(FormatError):
        Formatter(bad)


def test_logger_writes_one_line_per_stream_through_its_fd():
    r, w = os.pipe()
    try:
        AccessLogger(Formatter("%RESPONSE_CODE% %REQ(:PATH)%\n"), w).log(req(), None, None, info(response_code=204))
        assert os.read(r, 100) == b"204 /direct\n"
    finally:
        os.close(r)
        os.close(w)


def test_file_logger_from_proto_with_json_format_and_status_filter(tmp_path):
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.extensions.access_loggers.file.v3 import file_pb2

    path = tmp_path / "access.log"
    cfg = file_pb2.FileAccessLog(path=str(path))
    cfg.log_format.json_format.update({"code": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%", "ua": "%REQ(USER-AGENT)%",
                                       "f": "%RESPONSE_FLAGS%", "m": "%REQ(:METHOD)% %REQ(X-NONE)%"})
    proto = accesslog_pb2.AccessLog(name="envoy.access_loggers.file")
    proto.typed_config.Pack(cfg)
    proto.filter.status_code_filter.comparison.op = 1  # GE
    proto.filter.status_code_filter.comparison.value.default_value = 400
    logger = create_access_logger(proto, None)
    logger.log(req(), None, None, info(response_code=200))
    logger.log(req(), None, None, info(response_code=503))
    # As Envoy 1.40 prints it: sorted keys, null for a missing lone value, "-" inside text and for flags.
    assert path.read_text() == '{"code":503,"f":"-","m":"GET -","path":"/direct","ua":null}\n'
