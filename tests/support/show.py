"""Print what each target answers to a case file's requests, normalised, one line per request.

For writing cases and chasing differences by hand:

    python -m tests.support.show tests/diff_cases/http_data_path.yaml --targets envoy,wasmproxy --case head
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from wasmproxy.demo.upstream import start_in_thread

from .cases import CaseFile, DiffEnvironment, comparable, run_case
from .ports import free_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.show", description=__doc__.split("\n")[0])
    p.add_argument("case_file")
    p.add_argument("--targets", default="envoy", help="comma-separated: envoy, wasmproxy, envoy-twin")
    p.add_argument("--case", action="append", help="only this case (repeatable)")
    args = p.parse_args(argv)

    case_file = CaseFile.load(args.case_file)
    server, echo_port = start_in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp, \
                DiffEnvironment(case_file, Path(tmp), echo_port, free_port(), args.targets.split(",")) as env:
            for case in case_file.cases:
                if args.case and case.name not in args.case:
                    continue
                for name, target in env.targets.items():
                    normaliser = target.normaliser(case)
                    for i, (spec, r) in enumerate(zip(case.requests, run_case(case, target)), 1):
                        print(f"{case.name}#{i} {name}: {json.dumps(comparable(r, spec, normaliser, case))}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
