"""What the long-running commands (``serve``, ``device``) share: logs on stderr, a clean stop on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable


def log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until it returns; SIGINT or SIGTERM sets ``stop`` for a clean ending, and says so."""
    logger = logging.getLogger("dispatch")

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stop_on(signum: signal.Signals) -> None:
            if not stop.is_set():
                logger.info("%s: stopping", signum.name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_on, signum)
        # Long-running: what was imported stays for good, so full collections need not scan it again.
        gc.collect()
        gc.freeze()
        await main(stop)
        if stop.is_set():
            logger.info("stopped")

    asyncio.run(supervised())
