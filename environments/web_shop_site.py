"""A generated shop served over real HTTP on loopback: the website the web environment's browser visits.

Pages: a search form, paginated results, product pages whose options (size, fit) are links, a Buy button or a
cart with a checkout, and an order confirmation. Every interactive element carries a ``data-eid`` attribute
taken from the shop's data, so its id is the same on every visit. The site keeps each visit's cart and
orders (server state, keyed by a session id in the URL); the environment rewards what the site recorded.

A shop is plain JSON (it lives in ``task.data``)::

    {"products": [{"pid": 3, "title": "red shirt", "category": "shirt", "attrs": {"colour": "red"},
                   "price": 24, "options": {"size": ["s", "m", "l"]}, "eid": 17,
                   "option_eids": {"size": {"s": 31, "m": 5, "l": 70}}, "buy_eid": 44}, ...],
     "page_size": 5, "cart": false,
     "eids": {"query": 1, "go": 2, "next": 3, "prev": 4, "checkout": 6}}
"""

from __future__ import annotations

import html
import itertools
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

MAX_BODY_BYTES = 10_000
HEAD = '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{title}</title>' \
       "</head><body>{body}</body></html>"


def search_products(products: list[dict], query: str) -> list[dict]:
    """The products a query finds, best first: most query words in the title, then by product number.

    A word matches a title word or its plural ("shirts" finds "shirt").

    Example:
        >>> shop = [{"pid": 1, "title": "red hat"}, {"pid": 2, "title": "red shirt"}, {"pid": 3, "title": "blue shirt"}]
        >>> [p["pid"] for p in search_products(shop, "red shirts")]
        [2, 1, 3]
    """
    words = set(query.lower().split())
    scored = []
    for product in products:
        title = product["title"].split()
        hits = sum(1 for word in title if word in words or word + "s" in words)
        if hits:
            scored.append((-hits, product["pid"], product))
    return [product for *_, product in sorted(scored, key=lambda item: item[:2])]


def link_text(product: dict) -> str:
    """A product's link on a results page, as it reads: title and price, e.g. "red shirt $24"."""
    return f'{product["title"]} ${product["price"]}'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


class _Visit:
    """One episode's view of a shop: its cart and its orders."""

    def __init__(self, shop: dict) -> None:
        self.shop = shop
        self.products = {p["pid"]: p for p in shop["products"]}
        self.cart: list[dict] = []
        self.orders: list[list[dict]] = []


class ShopSite:
    """The shop's HTTP server, in a daemon thread of this process; one per environment instance.

    Example:
        >>> import urllib.request
        >>> site = ShopSite()
        >>> sid = site.open({"products": [], "page_size": 5, "cart": False, "eids": {"query": 1, "go": 2}})
        >>> "Search" in urllib.request.urlopen(site.home(sid)).read().decode()
        True
        >>> site.close()
    """

    def __init__(self) -> None:
        self.visits: dict[str, _Visit] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        site = self

        class Handler(_Handler):
            shop_site = site

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a short poll: close() waits for the serving loop to notice, and environments close once per episode
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="web-shop-site",
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def open(self, shop: dict) -> str:
        """Start a visit of ``shop`` (an empty cart, no orders); returns its session id."""
        with self._lock:
            sid = str(next(self._ids))
            self.visits[sid] = _Visit(shop)
        return sid

    def forget(self, sid: str) -> None:
        with self._lock:
            self.visits.pop(sid, None)

    def home(self, sid: str) -> str:
        return f"{self.url}/s/{sid}/"

    def orders(self, sid: str) -> list[list[dict]]:
        """The orders placed in a visit so far, oldest first; each is the list of items bought."""
        with self._lock:
            return [list(order) for order in self.visits[sid].orders]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    shop_site: ShopSite

    def log_message(self, *args: Any) -> None:  # quiet: the browser's every request would print a line
        pass

    def do_GET(self) -> None:
        self._answer("GET", {})

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length") or "0"
        if not _number(length) or int(length) > MAX_BODY_BYTES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _page("Too large", "<p>Request too large.</p>"))
            return
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace")).items()}
        self._answer("POST", form)

    def _answer(self, method: str, form: dict[str, str]) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        segments = parts.path.strip("/").split("/")
        site = self.shop_site
        with site._lock:
            visit = site.visits.get(segments[1]) if len(segments) >= 2 and segments[0] == "s" else None
            reply = _route(visit, f"/s/{segments[1]}" if visit else "", method, segments[2:], query, form)
        if reply is None:
            self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<p>Page not found.</p>"))
        elif isinstance(reply, tuple):  # (redirect target,)
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", reply[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(HTTPStatus.OK, reply)

    def _send(self, status: HTTPStatus, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _number(text: str) -> bool:
    """A small non-negative integer (str.isdigit alone lets through digits int() refuses, and 10**5000)."""
    return text.isascii() and text.isdigit() and len(text) <= 6


def _page(title: str, body: str) -> str:
    return HEAD.format(title=_e(title), body=body)


def _route(visit: _Visit | None, base: str, method: str, path: list[str], query: dict[str, str],
           form: dict[str, str]) -> str | tuple[str] | None:
    """A page (HTML), a redirect ``(url,)`` or None for "not found"."""
    if visit is None:
        return None
    page = path[0] if path else ""
    if method == "GET" and page == "" and len(path) <= 1:
        return _home(visit, base)
    if method == "GET" and page == "search" and len(path) == 1:
        return _results(visit, base, query.get("q", ""), query.get("page", "1"))
    if method == "GET" and page == "item" and len(path) == 2 and _number(path[1]):
        product = visit.products.get(int(path[1]))
        return None if product is None else _product(visit, base, product, _chosen(product, query))
    if method == "GET" and page == "cart" and len(path) == 1 and visit.shop["cart"]:
        return _cart(visit, base, query.get("empty") == "1")
    if method == "GET" and page == "order" and len(path) == 2 and _number(path[1]):
        number = int(path[1])
        return _order(visit.orders[number - 1]) if 1 <= number <= len(visit.orders) else None
    if method == "POST" and page in ("buy", "add") and len(path) == 1 and _number(form.get("pid", "")):
        product = visit.products.get(int(form["pid"]))
        if product is None or (page == "add") != visit.shop["cart"]:
            return None
        item = _item(product, _chosen(product, form))
        if page == "add":
            visit.cart.append(item)
            return (f"{base}/cart",)
        visit.orders.append([item])
        return (f"{base}/order/{len(visit.orders)}",)
    if method == "POST" and page == "checkout" and len(path) == 1 and visit.shop["cart"]:
        if not visit.cart:
            return (f"{base}/cart?empty=1",)
        visit.orders.append(visit.cart)
        visit.cart = []
        return (f"{base}/order/{len(visit.orders)}",)
    return None


def _chosen(product: dict, values: dict[str, str]) -> dict[str, str]:
    """The options of ``product`` that ``values`` sets to one of its offered values."""
    return {dim: values[dim] for dim, offered in product["options"].items() if values.get(dim) in offered}


def _item(product: dict, chosen: dict[str, str]) -> dict:
    return {"pid": product["pid"], "title": product["title"], "category": product["category"],
            "attrs": dict(product["attrs"]), "price": product["price"], "options": chosen}


def _home(visit: _Visit, base: str) -> str:
    eids = visit.shop["eids"]
    body = (f'<form method="get" action="{base}/search"><input type="text" name="q" data-eid="{eids["query"]}">'
            f'<button type="submit" data-eid="{eids["go"]}">Search</button></form>')
    return _page("Shop", body)


def _results(visit: _Visit, base: str, query: str, page: str) -> str:
    found = search_products(visit.shop["products"], query)
    size = visit.shop["page_size"]
    pages = max(1, -(-len(found) // size))
    number = min(max(int(page), 1), pages) if _number(page) else 1
    shown = found[(number - 1) * size: number * size]
    head = f"Results for &quot;{_e(query)}&quot;" + (f" (page {number} of {pages})" if pages > 1 else "")
    items = "".join(f'<li><a href="{base}/item/{p["pid"]}" data-eid="{p["eid"]}">{_e(link_text(p))}</a></li>'
                    for p in shown)
    links, eids, q = [], visit.shop["eids"], _e(query)
    if number > 1:
        links.append(f'<a href="{base}/search?{_e(urlencode({"q": query, "page": number - 1}))}" '
                     f'data-eid="{eids["prev"]}">Prev</a>')
    if number < pages:
        links.append(f'<a href="{base}/search?{_e(urlencode({"q": query, "page": number + 1}))}" '
                     f'data-eid="{eids["next"]}">Next</a>')
    body = f"<p>{head}</p>" + (f"<ul>{items}</ul>" if shown else "<p>No products found.</p>")
    body += f"<p>{' '.join(links)}</p>" if links else ""
    return _page(f"Search {q}", body)


def _product(visit: _Visit, base: str, product: dict, chosen: dict[str, str]) -> str:
    rows = []
    for dim, offered in product["options"].items():
        links = []
        for value in offered:
            href = f"{base}/item/{product['pid']}?{urlencode({**chosen, dim: value})}"
            current = ' aria-current="true"' if chosen.get(dim) == value else ""
            links.append(f'<a href="{_e(href)}" data-eid="{product["option_eids"][dim][value]}"{current}>'
                         f"{_e(value)}</a>")
        rows.append(f"<p>{_e(dim)}: {' '.join(links)}</p>")
    hidden = "".join(f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in chosen.items())
    action, label = ("add", "Add to cart") if visit.shop["cart"] else ("buy", "Buy")
    form = (f'<form method="post" action="{base}/{action}"><input type="hidden" name="pid" value="{product["pid"]}">'
            f'{hidden}<button type="submit" data-eid="{product["buy_eid"]}">{label}</button></form>')
    body = f"<h1>{_e(product['title'])}</h1><p>Price: ${product['price']}</p>{''.join(rows)}{form}"
    return _page(product["title"], body)


def _describe(item: dict) -> str:
    options = ", ".join(f"{k} {v}" for k, v in item["options"].items())
    return f"{_e(item['title'])}{', ' + _e(options) if options else ''}: ${item['price']}"


def _cart(visit: _Visit, base: str, empty_refused: bool) -> str:
    lines = "".join(f"<li>{_describe(item)}</li>" for item in visit.cart)
    body = "<h1>Cart</h1>" + (f"<ul>{lines}</ul><p>Total: ${sum(i['price'] for i in visit.cart)}</p>"
                              if visit.cart else "<p>Your cart is empty.</p>")
    if empty_refused:
        body += "<p>Nothing to check out.</p>"
    body += (f'<form method="post" action="{base}/checkout"><button type="submit" '
             f'data-eid="{visit.shop["eids"]["checkout"]}">Checkout</button></form>')
    return _page("Cart", body)


def _order(items: list[dict]) -> str:
    lines = "".join(f"<li>{_describe(item)}</li>" for item in items)
    body = f"<h1>Order placed</h1><ul>{lines}</ul><p>Total: ${sum(i['price'] for i in items)}</p>"
    return _page("Order placed", body)
