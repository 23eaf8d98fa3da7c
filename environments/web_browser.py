"""The browser behind the web environment: one headless Chromium per process, driven by Playwright.

Environments borrow pages from :class:`BrowserHost` and get each page back as compact text (:data:`RENDER_JS`).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import threading
from typing import Any

# Chromium, headless, as this platform needs it (docs/envs/web.md); Playwright adds --headless and its own
# fresh --user-data-dir.
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-dev-shm-usage")
INSTALL_HINT = "install it with `bash launch/setup_browser.sh` (apt-get install -y chromium)"
NAV_TIMEOUT_MS = 15_000  # a page of the local site loads in ~0.2 s; this is for a machine under heavy load
ACTION_TIMEOUT_MS = 10_000  # an element that cannot be clicked in this time is the model's error, not a hang
CALL_TIMEOUT_S = 60.0  # the whole browser call, waited for from the environment's thread
GRACE_S = 3.0  # the browser outlives the last environment's close() this long, for env-per-episode callers
IDLE_S = 120.0  # ...and closes after this long without any browser call, even if environments never close
MAX_PAGES = 16  # pages kept; beyond this an idle environment's page is lent to another (it re-opens its URL)

# Page -> compact text. Interactive elements are "[id] kind "label""; other text is joined into lines at
# block elements. Ids are the site's data-eid attributes; elements without one are numbered after them.
RENDER_JS = r"""() => {
  const BLOCK = new Set(["P","DIV","LI","UL","OL","H1","H2","H3","H4","H5","H6","FORM","TABLE","TR","SECTION",
                         "HEADER","FOOTER","NAV","MAIN","ARTICLE","BR","HR","BODY"]);
  const SKIP = new Set(["SCRIPT","STYLE","NOSCRIPT","TEMPLATE","HEAD"]);
  let next = 1;
  for (const el of document.querySelectorAll("[data-eid]")) next = Math.max(next, (parseInt(el.dataset.eid) || 0) + 1);
  const lines = []; let line = [];
  const flush = () => { const t = line.join(" ").replace(/\s+/g, " ").trim(); if (t) lines.push(t); line = []; };
  const kindOf = (el) => {
    const tag = el.tagName;
    if (tag === "A" && el.hasAttribute("href")) return "link";
    if (tag === "BUTTON") return "button";
    if (tag === "TEXTAREA") return "textbox";
    if (tag === "SELECT") return "combobox";
    if (tag === "INPUT") {
      const t = (el.getAttribute("type") || "text").toLowerCase();
      if (t === "hidden") return null;
      if (["submit", "button", "reset", "image"].includes(t)) return "button";
      return (t === "checkbox" || t === "radio") ? t : "textbox";
    }
    const role = el.getAttribute("role");
    return (role === "button" || role === "link") ? role : null;
  };
  const labelOf = (el, kind) => {
    let text = kind === "textbox" ? el.value : (el.tagName === "INPUT" && kind === "button") ? el.value
             : (kind === "checkbox" || kind === "radio") ? (el.labels && el.labels[0] ? el.labels[0].innerText : "")
             : el.innerText;
    text = (text || "").replace(/\s+/g, " ").trim();
    return text.length > 80 ? text.slice(0, 80) + "..." : text;
  };
  const walk = (node) => {
    if (node.nodeType === 3) { line.push(node.nodeValue); return; }
    if (node.nodeType !== 1 || SKIP.has(node.tagName)) return;
    if (node.checkVisibility && !node.checkVisibility()) return;
    if (node.tagName === "LABEL" && node.control) {  // the control shows the label's text itself
      if (node.contains(node.control)) walk(node.control);
      return;
    }
    const kind = kindOf(node);
    if (kind) {
      if (!node.dataset.eid) node.dataset.eid = String(next++);
      const on = ["aria-current", "aria-pressed", "aria-selected"].some((a) => node.getAttribute(a) === "true");
      const state = node.checked ? " (checked)" : on ? " (selected)" : "";
      line.push(`[${node.dataset.eid}] ${kind} ${JSON.stringify(labelOf(node, kind))}${state}`);
      return;
    }
    const block = BLOCK.has(node.tagName);
    if (block) flush();
    for (const child of node.childNodes) walk(child);
    if (block) flush();
  };
  if (document.body) walk(document.body);
  flush();
  return lines.join("\n");
}"""


class BrowserHost:
    """One headless Chromium for this process, shared by every web environment, driven from its own thread.

    Playwright's sync API is bound to one thread and refuses to run inside an asyncio loop; environments are
    stepped from worker threads (the env service) and from inside the rollout engine's loop. So the async API
    runs on a private loop thread and environments submit coroutines to it. Each environment borrows a page
    (pages share one browser context: the site keeps state per session id in the URL, not in cookies). The
    browser starts on the first call and stops :data:`GRACE_S` after the last environment closes, or after
    :data:`IDLE_S` without a call; an environment whose page went away re-opens its URL on a new one.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="web-browser", daemon=True)
        self.thread.start()
        self.starts = 0  # how many times a browser was launched (tests read it)
        self._playwright: Any = None
        self._context: Any = None
        self._pages: dict[int, Any] = {}  # environment key -> its page
        self._idle: list[tuple[Any, asyncio.Task]] = []  # pages no environment holds, each being blanked
        self._busy: set[int] = set()
        self._holders: set[int] = set()  # environments that have not closed
        self._stopper: asyncio.TimerHandle | None = None
        self._last_call = 0.0
        self._lock = asyncio.Lock()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``await fn(*args)`` on the browser thread; blocks the calling thread until it is done."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(CALL_TIMEOUT_S)

    async def with_page(self, key: int, action: Any) -> Any:
        """``await action(page)`` on environment ``key``'s page (a new or re-used one if it has none)."""
        self._holders.add(key)
        self._busy.add(key)
        self._last_call = self.loop.time()
        self._schedule_stop()
        try:
            async with self._lock:  # one launch, and no page handed out twice
                page = await self._page_for(key)
            return await action(page)
        finally:
            self._busy.discard(key)
            self._last_call = self.loop.time()

    async def _page_for(self, key: int) -> Any:
        if key in self._pages:
            self._pages[key] = self._pages.pop(key)  # the dict's order is the order of use
            return self._pages[key]
        if self._context is None:
            await self._launch()
        if self._idle:
            page, blanking = self._idle.pop()
            await blanking  # or it could land after the new owner's navigation
        elif len(self._pages) >= MAX_PAGES and set(self._pages) - self._busy:
            # the least recently used page of an environment not in a call: that one re-opens its URL later
            owner = next(k for k in self._pages if k not in self._busy)
            page = self._pages.pop(owner)
        else:
            page = await self._context.new_page()
            page.set_default_navigation_timeout(NAV_TIMEOUT_MS)
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
        self._pages[key] = page
        return page

    async def _launch(self) -> None:
        try:
            from playwright.async_api import async_playwright
        except ImportError:
            raise RuntimeError("the web environment needs Playwright: pip install playwright==1.65.2") from None
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        if executable is None:
            raise RuntimeError(f"the web environment needs Chromium, which is not installed: {INSTALL_HINT}")
        playwright = await async_playwright().start()
        try:
            browser = await playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_FLAGS),
                                                       headless=True, timeout=NAV_TIMEOUT_MS * 2)
            self._context = await browser.new_context()
        except BaseException:
            await playwright.stop()
            raise
        self._playwright = playwright
        self.starts += 1

    def release(self, key: int) -> None:
        """Environment ``key`` is done (closed or collected): its page goes back to the pool. Thread-safe."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._release, key)

    def _release(self, key: int) -> None:
        self._holders.discard(key)
        page = self._pages.pop(key, None)
        if page is not None:  # a page left on a site keeps its renderer busy
            self._idle.append((page, asyncio.ensure_future(_blank(page))))
        self._schedule_stop()

    def _schedule_stop(self) -> None:
        if self._stopper is not None:
            self._stopper.cancel()
        delay = GRACE_S if not self._holders else IDLE_S
        self._stopper = self.loop.call_later(delay, lambda: asyncio.ensure_future(self._stop_if_unused()))

    async def _stop_if_unused(self) -> None:
        idle_for = self.loop.time() - self._last_call
        if self._busy or (self._holders and idle_for < IDLE_S):
            return
        await self.stop()

    async def stop(self) -> None:
        """Close the browser and Playwright's driver (environments get a new one on their next call)."""
        async with self._lock:
            context, playwright = self._context, self._playwright
            self._context = self._playwright = None
            self._pages.clear()
            self._idle.clear()
            if context is not None:
                await context.browser.close()
                await playwright.stop()

    def running(self) -> bool:
        return self._context is not None


async def _blank(page: Any) -> None:
    try:
        await page.goto("about:blank")
    except Exception:  # the browser stopped meanwhile: the page is gone with it
        pass


_host: BrowserHost | None = None
_host_lock = threading.Lock()


def browser_host() -> BrowserHost:
    """This process's :class:`BrowserHost` (a forked child makes its own)."""
    global _host
    with _host_lock:
        if _host is None or _host.pid != os.getpid():
            _host = BrowserHost()
        return _host


def shutdown_browser() -> None:
    """Close this process's browser now, if one runs (also called at exit)."""
    host = _host
    if host is not None and host.pid == os.getpid() and host.thread.is_alive():
        host.call(host.stop)


atexit.register(shutdown_browser)


def release_page(key: int) -> None:
    """Environment ``key`` is done: its page goes back to this process's browser, if one runs."""
    host = _host
    if host is not None and host.pid == os.getpid():
        host.release(key)
