"""wasmproxy's Proxy-Wasm test plugins: sources here, built by `python -m plugins.build` into plugins/out/."""
