"""The `wasmproxy` command line: Envoy's flags, Envoy's exit codes.

`wasmproxy -c envoy.yaml` serves the config; `--mode validate` checks it and exits
0 (valid) or 1 (invalid) without serving; with neither -c nor --config-yaml the
embedded demo runs (a listener on 127.0.0.1:10000, an example plugin, a demo
upstream started in-process), so the proxy works out of the box.

Flags Envoy has that only matter to Envoy's hot restart (--base-id,
--disable-hot-restart, ...) are accepted and ignored, so existing command lines
keep working.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from . import __version__

LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


@dataclass(slots=True)
class Options:
    """What the command line asked for (Envoy's Server::Options)."""

    config_path: str | None = None
    config_yaml: str | None = None
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "info"
    component_log_level: str = ""
    mode: str = "serve"
    drain_time_s: int = 600
    service_cluster: str = ""
    service_node: str = ""
    service_zone: str = ""
    log_path: str | None = None
    admin_address_path: str | None = None
    demo: bool = False
    # wasmproxy's own sandbox limits (Envoy has no CPU deadline; its memory cap is 1 GiB).
    wasm_callback_deadline_ms: int = 100
    wasm_memory_limit_mb: int = 1024
    watch_config: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wasmproxy",
        description="Envoy-compatible HTTP proxy with Proxy-Wasm plugins. "
        "Without -c/--config-yaml it runs the embedded demo.",
        epilog="wasmproxy inspect PLUGIN.wasm [--json]: what a plugin exports and needs.",
    )
    p.add_argument("-c", "--config-path", help="Envoy v3 bootstrap config (YAML or JSON)")
    p.add_argument("--config-yaml", help="bootstrap YAML, merged over the file as Envoy does")
    p.add_argument("--concurrency", type=int, default=None, help="worker threads (default: number of cores)")
    p.add_argument("-l", "--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    p.add_argument("--component-log-level", default="", help="comma-separated component:level pairs")
    p.add_argument("--mode", default="serve", choices=("serve", "validate"))
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--drain-time-s", type=int, default=600)
    p.add_argument("--watch-config", action="store_true",
                   help="reload the config file when it changes (SIGHUP always reloads it)")
    p.add_argument("--service-cluster", default="")
    p.add_argument("--service-node", default="")
    p.add_argument("--service-zone", default="")
    p.add_argument("--log-path", default=None)
    p.add_argument("--admin-address-path", default=None, help="write the admin address to this file once bound")
    p.add_argument("--wasm-callback-deadline-ms", type=int, default=100,
                   help="interrupt a Wasm plugin callback running longer than this (0: never)")
    p.add_argument("--wasm-memory-limit-mb", type=int, default=1024,
                   help="linear memory cap of each Wasm VM, in MiB (default 1024, as Envoy)")
    # Accepted for command-line compatibility with Envoy; they configure hot restart, which we do not have.
    for flag in ("--base-id", "--restart-epoch", "--parent-shutdown-time-s", "--drain-strategy", "--log-format"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in ("--disable-hot-restart", "--use-dynamic-base-id", "--allow-unknown-static-fields",
                 "--reject-unknown-dynamic-fields", "--ignore-unknown-dynamic-fields", "--enable-core-dump"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p


def parse_options(argv: list[str] | None = None) -> Options | int:
    """Parse argv into Options, or return an exit code (for --version)."""
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"wasmproxy  version: {__version__}/envoy-1.40-compatible/Python-{sys.version.split()[0]}")
        return 0
    if args.wasm_callback_deadline_ms < 0:
        build_parser().error("--wasm-callback-deadline-ms must be >= 0")
    if args.wasm_memory_limit_mb < 1:
        build_parser().error("--wasm-memory-limit-mb must be >= 1")
    if args.concurrency is not None and args.concurrency < 1:
        # Envoy treats 0 as 1 worker; a negative count is a usage error.
        if args.concurrency < 0:
            build_parser().error("--concurrency must be >= 0")
        args.concurrency = 1
    opts = Options(
        config_path=args.config_path,
        config_yaml=args.config_yaml,
        log_level="warning" if args.log_level == "warn" else args.log_level,
        component_log_level=args.component_log_level,
        mode=args.mode,
        drain_time_s=args.drain_time_s,
        service_cluster=args.service_cluster,
        service_node=args.service_node,
        service_zone=args.service_zone,
        log_path=args.log_path,
        admin_address_path=args.admin_address_path,
        demo=args.config_path is None and args.config_yaml is None,
        wasm_callback_deadline_ms=args.wasm_callback_deadline_ms,
        wasm_memory_limit_mb=args.wasm_memory_limit_mb,
        watch_config=args.watch_config,
    )
    if args.concurrency is not None:
        opts.concurrency = args.concurrency
    return opts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["inspect"]:  # `wasmproxy inspect plugin.wasm`; everything else is Envoy's flags
        from .inspect import main as inspect_main

        return inspect_main(args[1:])
    parsed = parse_options(argv)
    if isinstance(parsed, int):
        return parsed
    opts = parsed
    from . import log

    log.configure(opts.log_level, component_levels=opts.component_log_level)
    if opts.mode == "validate":
        return _validate(opts)
    from .server import run_server

    return run_server(opts)


def _validate(opts: Options) -> int:
    """--mode validate: print what is wrong (or Envoy's OK line) and return 0 / 1.

    Beyond Envoy's checks, every Wasm plugin the config references is inspected
    (ABI marker, imports this build provides), so a plugin that would fail to
    load fails validation instead of the first start.
    """
    from .config import load_bootstrap, validate_config, validate_ok_message
    from .inspect import check_config_plugins

    if opts.demo:
        from .demo import demo_config_text

        opts.config_yaml = demo_config_text(upstream_port=1)
    messages = validate_config(opts.config_path, config_yaml=opts.config_yaml)
    if not messages:
        messages = check_config_plugins(load_bootstrap(opts.config_path, config_yaml=opts.config_yaml))
    if messages:
        for m in messages:
            print(m, file=sys.stderr)
        return 1
    print(validate_ok_message(opts.config_path or "<config-yaml>"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
