"""Envoy's admin interface: a sans-IO handler and a small HTTP/1.1 server on the main dispatcher."""

from wasmproxy.admin.handler import AdminHandler, ClusterStatus, HostStatus, Response
from wasmproxy.admin.server import AdminServer

__all__ = ["AdminHandler", "AdminServer", "ClusterStatus", "HostStatus", "Response"]
