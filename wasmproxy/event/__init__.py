"""Event loop per thread (Dispatcher) and the watchdog that checks the loops keep turning."""

from wasmproxy.event.dispatcher import (
    Dispatcher,
    DispatcherExitedError,
    DispatcherStatistics,
    RealTimeSource,
    SimulatedTimeSource,
    TimeSource,
    Timer,
)

__all__ = ["Dispatcher", "DispatcherExitedError", "DispatcherStatistics", "RealTimeSource", "SimulatedTimeSource", "TimeSource", "Timer"]
