"""`glimprouter-worker`: one model behind the ModelWorker gRPC contract."""
from __future__ import annotations

import asyncio
import logging
import sys

from services.common import settings as settings_mod
from services.worker.config import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    s = settings_mod.load(WorkerSettings, argv, prog="glimprouter-worker", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glimprouter.worker").info("starting with %s", settings_mod.describe(s))
    from services.worker.backends import create_engine
    from services.worker.server import serve

    try:
        engine = create_engine(s)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        print(f"glimprouter-worker: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(s, engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
