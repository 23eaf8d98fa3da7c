"""Running an ASGI app with uvicorn: in a background thread (tests, notebooks) or as the process's server.

Shared by ``agentrl serve-env`` (``agentrl.envs.server``) and ``agentrl serve-controller``
(``agentrl.envs.controller_server``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

# Seconds an idle keep-alive connection stays open. Well above httpx's keepalive_expiry (5 s), so the client
# always drops an idle connection before the server does: at uvicorn's default (also 5 s), a request sent
# as the server closes the connection fails (RemoteProtocolError), and an agent that thinks for about 5 s
# between tool calls would hit that now and then.
KEEP_ALIVE_S = 75


def _url(server) -> str:
    """The URL a started uvicorn server listens on (port 0 picked a free port)."""
    bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host  # an IPv6 address
    return f"http://{shown}:{bound_port}"


@contextmanager
def serve_app_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve an ASGI ``app`` from a background thread while the ``with`` block runs; yields its URL."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="agentrl-http-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.005)
    try:
        yield _url(server)
    finally:
        server.should_exit = True
        thread.join()


def run_app(app: Any, host: str, port: int, announce: Callable[[str], None] = print, log_level: str = "warning",
            prepare: Callable[[], Awaitable[None]] | None = None,
            started: Callable[[str], Awaitable[None]] | None = None,
            stopping: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT/SIGTERM shut it down gracefully).

    Args:
        announce: gets the URL once the server listens (port 0 picks a free port, and the URL says which).
        prepare: awaited in the server's event loop before it listens; what it raises stops the start.
        started: awaited with the URL once it listens (e.g. to join a controller); what it raises stops the
            server and is raised here.
        stopping: awaited when shutdown begins, before connections close, if ``started`` succeeded (uvicorn
            re-raises a caught SIGTERM once it has stopped, so code after it would never run).
    """
    import uvicorn

    joined = False

    class Server(uvicorn.Server):
        async def serve(self, sockets: list | None = None) -> None:
            nonlocal joined
            if prepare is not None:
                await prepare()
            serving = asyncio.create_task(super().serve(sockets))
            while not self.started and not serving.done():
                await asyncio.sleep(0.01)
            if not self.started:
                await serving
                return
            url = _url(self)
            announce(url)
            if started is not None:
                try:
                    await started(url)
                except BaseException:
                    self.should_exit = True
                    await serving
                    raise
            joined = True
            await serving

        async def shutdown(self, sockets: list | None = None) -> None:
            if stopping is not None and joined:
                await stopping()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5)
    Server(config).run()  # uvicorn's run picks the event loop: uvloop where it is installed
