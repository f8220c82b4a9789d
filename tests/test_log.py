"""log: Envoy's line format, level names, per-component levels, laziness when disabled."""

from __future__ import annotations

import io
import re

import pytest

from wasmproxy import log


@pytest.fixture
def buf():
    out = io.StringIO()
    log.configure("info", stream=out)
    yield out
    log.configure("info")


def test_line_format_matches_envoy(buf) -> None:
    log.get_logger("wasm").info("hello %s", "world")
    line = buf.getvalue().rstrip("\n")
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]\[\d+\]\[info\]\[wasm\] hello world", line)


def test_levels_use_envoy_names(buf) -> None:
    log.set_log_level("trace")
    lg = log.get_logger("upstream")
    lg.trace("t")
    lg.debug("d")
    lg.warning("w")
    lg.error("e")
    lg.critical("c")
    levels = re.findall(r"\]\[(\w+)\]\[upstream\]", buf.getvalue())
    assert levels == ["trace", "debug", "warning", "error", "critical"]


def test_global_level_and_component_override(buf) -> None:
    log.set_log_level("warning")
    log.get_logger("http").info("hidden")
    log.set_component_log_level("http:debug")
    log.get_logger("http").debug("shown")
    log.get_logger("router").info("hidden too")
    assert "shown" in buf.getvalue()
    assert "hidden" not in buf.getvalue()
    log.set_log_level("off")
    log.get_logger("http").critical("nothing")
    assert "nothing" not in buf.getvalue()


def test_disabled_level_does_not_format(buf) -> None:
    class Expensive:
        def __str__(self) -> str:
            raise AssertionError("formatted while disabled")

    log.set_log_level("info")
    log.get_logger("wasm").debug("value %s", Expensive())
    log.get_logger("wasm").trace("value %s", Expensive())
    assert buf.getvalue() == ""


def test_default_handler_follows_sys_stderr(capsys) -> None:
    log.configure("info")
    log.get_logger("main").warning("to the current stderr")
    assert "[warning][main] to the current stderr" in capsys.readouterr().err


def test_parse_level_accepts_envoy_aliases_and_rejects_unknown() -> None:
    assert log.parse_level("warn") == log.parse_level("warning")
    assert log.parse_level("err") == log.parse_level("error")
    # Envoy 1.40's messages for -l loud, --component-log-level wasm, --component-log-level nope:debug.
    with pytest.raises(ValueError, match="^error: invalid log level specified 'loud'$"):
        log.parse_level("loud")
    with pytest.raises(ValueError, match="^error: component log level not correctly specified 'wasm'$"):
        log.set_component_log_level("wasm")
    with pytest.raises(ValueError, match="^error: invalid component specified 'nope'$"):
        log.set_component_log_level("nope:debug")


def test_active_loggers_list_envoys_names_then_ours(buf) -> None:
    log.get_logger("zz_custom_component")
    names = [n for n, _ in log.active_loggers()]
    assert names[: len(log.ENVOY_LOGGERS)] == list(log.ENVOY_LOGGERS)
    assert "zz_custom_component" in names[len(log.ENVOY_LOGGERS):]
    log.set_component_log_level("zz_custom_component:error")
    assert dict(log.active_loggers())["zz_custom_component"] == "error"
    assert dict(log.active_loggers())["wasm"] == "info"


def test_set_logger_level_unknown_and_configure_component_levels() -> None:
    out = io.StringIO()
    try:
        log.configure("warning", stream=out, component_levels="wasm:debug")
        log.get_logger("wasm").debug("dbg")
        assert "[debug][wasm] dbg" in out.getvalue()
        with pytest.raises(KeyError):
            log.set_logger_level("nope", "info")
    finally:
        log.configure("info")


def test_log_format_patterns() -> None:
    out = io.StringIO()
    try:
        log.configure("info", stream=out, log_format='{"lvl":"%l","short":"%L","comp":"%n","msg":"%j"} %s:%# %%')
        log.get_logger("router").warning('say "hi"')
        line = out.getvalue().rstrip("\n")
        assert re.fullmatch(
            r'\{"lvl":"warning","short":"W","comp":"router","msg":"say \\"hi\\""\} test_log\.py:\d+ %', line
        ), line
        out.truncate(0)
        out.seek(0)
        log.configure("info", stream=out, log_format="%Y-%m-%dT%T.%f %P [%t]")
        log.get_logger("main").info("x")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6} \d+ \[\d+\]", out.getvalue().rstrip("\n"))
    finally:
        log.configure("info")
