"""wasmproxy: an Envoy-compatible HTTP proxy whose extension mechanism is the Proxy-Wasm sandbox."""

__version__ = "0.1.0"
