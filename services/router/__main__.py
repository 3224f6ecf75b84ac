"""`glimprouter-router`: the step loop over a small and a large worker pool, sessions in Redis."""
from __future__ import annotations

import asyncio
import logging
import sys

from services.common import settings as settings_mod
from services.router.config import RouterSettings


def main(argv: list[str] | None = None) -> int:
    s = settings_mod.load(RouterSettings, argv, prog="glimprouter-router", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glimprouter.router").info("starting with %s", settings_mod.describe(s))
    from services.router.server import serve
    from services.router.errors import RouterError

    try:
        asyncio.run(serve(s))
    except RouterError as exc:  # e.g. no worker answered at startup
        print(f"glimprouter-router: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
