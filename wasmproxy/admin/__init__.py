"""Envoy's admin interface: a sans-IO handler, a small HTTP/1.1 server on the main dispatcher,
and ``start_admin`` that wires both to the Server."""

from wasmproxy.admin.handler import AdminHandler, ClusterStatus, HostStatus, Response
from wasmproxy.admin.server import AdminServer
from wasmproxy.admin.start import AdminHost, start_admin

__all__ = ["AdminHandler", "AdminHost", "AdminServer", "ClusterStatus", "HostStatus", "Response", "start_admin"]
