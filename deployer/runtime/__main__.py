"""``python -m deployer.runtime --config FILE.json [--host 0.0.0.0] [--port 8000]``: what the Modal container runs.

FILE.json is ``RuntimeConfig.to_json()`` output. The API key comes from the file or from
``GGUF_DEPLOY_API_KEY``. Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deployer.errors import EXIT_FAILURE, GgufDeployError
from deployer.runtime.config import RuntimeConfig
from deployer.runtime.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployer.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="FILE.json", help="RuntimeConfig.to_json() output")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")  # noqa: S104 -- the container's port
    parser.add_argument("--port", default=8000, type=int, help="port to listen on; 0 picks a free one (default: 8000)")
    args = parser.parse_args(argv)
    try:
        text = Path(args.config).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: {args.config}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        config = RuntimeConfig.from_json(text)
    except (ValueError, TypeError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        serve(config, args.host, args.port)
    except GgufDeployError as exc:
        for line in exc.show():
            print(line, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the server took over the signal
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
