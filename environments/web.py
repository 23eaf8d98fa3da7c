"""Web shop: buy the product an instruction describes, in a real headless Chromium on a local generated shop.

The site (:mod:`environments.web_shop_site`) is real HTTP on loopback; the browser is Chromium driven by
Playwright. The model sees each page as compact text with element ids (``[17] link "red shirt $24"``) and acts
with ``search``, ``click``, ``back`` and ``read``. The reward, 0-1 with partial credit in the manner of
WebShop, scores the order the site recorded against the instruction.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import weakref
from typing import Any

from agentrl.envs.base import ToolEnvironment, in_test_split, tool
from agentrl.envs.schema import function_schema
from agentrl.envs.tools import Tool, ToolError
from agentrl.types import Message, Task, ToolCall
from environments.web_browser import RENDER_JS, browser_host, release_page
from environments.web_shop_site import ShopSite, link_text, search_products

CATEGORIES = ("shirt", "hat", "coat", "dress", "scarf", "skirt", "jacket", "sweater")
COLOURS = ("red", "blue", "green", "black", "white", "pink", "gray", "brown")
MATERIALS = ("cotton", "wool", "silk", "linen", "denim", "leather")
ATTRIBUTES = (("colour", COLOURS), ("material", MATERIALS))  # the first `attributes` of these name a product
OPTIONS = (("size", ("s", "m", "l", "xl")), ("fit", ("slim", "regular", "loose")))  # chosen on its page
LIMITS = tuple(range(20, 100, 10))  # "under N dollars"
TEMPLATES = ("Buy a {item}.", "I need a {item}. Please buy it.", "Find a {item} and buy it.",
             "Please purchase a {item}.")
TOOLS = ("search", "click", "back", "read")
CLICK_BY = ("id", "text")
PHRASINGS = ("varied", "plain", "quoted", "title")
ELEMENT = re.compile(r'\[(\d+)\] (\w+) ("(?:[^"\\]|\\.)*")')  # '[17] link "red shirt $24"', as RENDER_JS writes it
MAX_QUERY_CHARS = 100
MAX_DRAWS = 1000
DEFAULTS = {"products": 12, "attributes": 2, "options": 2, "price_limit": True, "page_size": 4, "cart": True,
            "phrasing": "varied", "tools": TOOLS, "click": "id"}
EASY = {"products": 3, "attributes": 1, "options": 1, "price_limit": False, "page_size": 5, "cart": False,
        "phrasing": "title", "tools": ("search", "click"), "click": "text"}



def title_of(item: dict) -> str:
    """A product's title, or the title a goal asks for: its attributes, then its category ("red shirt")."""
    return " ".join([*item["attrs"].values(), item["category"]])


def score_order(items: list[dict], goal: dict) -> float:
    """WebShop-style match of an order to the goal, 0-1: for each item, the share of the goal's checks it
    passes (each attribute, each option chosen, the price limit), 0 for the wrong kind of product; the order's
    score is the mean over its items, so buying extras costs reward.

    Example:
        >>> goal = {"category": "shirt", "attrs": {"colour": "red"}, "options": {"size": "m"}, "max_price": 30}
        >>> item = {"category": "shirt", "attrs": {"colour": "red"}, "options": {"size": "s"}, "price": 24}
        >>> score_order([item], goal)
        0.6666666666666666
    """
    if not items:
        return 0.0
    total = 0.0
    for item in items:
        if item["category"] != goal["category"]:
            continue
        checks = [item["attrs"].get(k) == v for k, v in goal["attrs"].items()]
        checks += [item["options"].get(k) == v for k, v in goal["options"].items()]
        if goal["max_price"] is not None:
            checks.append(item["price"] < goal["max_price"])
        total += sum(checks) / len(checks) if checks else 1.0
    return total / len(items)


class WebShopEnv(ToolEnvironment):
    """Buy what the instruction asks for in a generated web shop, through a real headless Chromium.

    Args:
        products: products in each task's shop (the wanted one and near misses).
        attributes: 1 (colour) or 2 (colour and material) name the product in its title.
        options: 0-2 options chosen on the product page (size, then fit).
        price_limit: the instruction sets a price limit ("under 40 dollars") and some near misses break it.
        page_size: search results per page (more results are on Next pages).
        cart: buy through "Add to cart" and the cart's Checkout; otherwise a Buy button on the product page.
        phrasing: "varied" (four instruction templates), "plain" (one), "quoted" (one, with every value the
            model types in double quotes, 'Buy a "red" "shirt" in size "m".': a byte-level BPE reads ` shirt`
            after a space and `shirt` after a quote, as in a call's JSON, as different tokens) or "title" (one,
            with the product's whole title quoted as one phrase, 'Buy a "red shirt" in size "m".'; the oracle
            then searches for the title and clicks it by its text, so one quoted phrase is copied twice).
        tools: the tools offered, a subset of ("search", "click", "back", "read") with search and click.
        click: "id" (``click(id)``, the page shows element ids) or "text" (``click(text)`` by the element's
            label or its first words, e.g. "red shirt", "m", "Buy", as WebShop's ``click[...]``; pages are
            shown without ids). With "text" a small model copies the words of the instruction instead of
            looking up a number that stands before them on the page.
    """

    name = "web"
    version = "web-v1"
    system_prompt = "Shop on the website: search, click ids to choose the product and options, then buy."
    split_sizes = {"train": 100_000, "test": 50}  # every test episode is a real browser session (~1 s each)
    blocking = True  # calls wait on Chromium: the rollout engine runs them in worker threads

    def __init__(self, products: int = 12, attributes: int = 2, options: int = 2, price_limit: bool = True,
                 page_size: int = 4, cart: bool = True, phrasing: str = "varied",
                 tools: tuple[str, ...] = TOOLS, click: str = "id") -> None:
        tools = tuple(tools)  # configs may pass a list
        if not 1 <= attributes <= len(ATTRIBUTES):
            raise ValueError(f"attributes must be 1..{len(ATTRIBUTES)}, got {attributes}")
        if not 0 <= options <= len(OPTIONS):
            raise ValueError(f"options must be 0..{len(OPTIONS)}, got {options}")
        if not 2 <= products <= 40:
            raise ValueError(f"products must be 2..40, got {products}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        if not {"search", "click"} <= set(tools) <= set(TOOLS):
            raise ValueError(f"tools must include search and click, within {TOOLS}, got {tools}")
        if click not in CLICK_BY:
            raise ValueError(f"click must be one of {CLICK_BY}, got {click!r}")
        tools = tuple(name for name in TOOLS if name in tools)  # one spelling per set, for the version
        extra = [Tool(function_schema(getattr(self, name), name), getattr(self, name))
                 for name in TOOLS if name in tools and name not in ("search", "click")]
        super().__init__(tools=extra)
        if click == "text":
            self.replace_tool(Tool(function_schema(self.click_text, "click"), self.click_text))
            self.system_prompt = ("Shop on the website: search, click the product and its options by their text, "
                                  "then buy.")
        self.click_by = click
        self.products, self.attributes, self.options, self.price_limit = products, attributes, options, price_limit
        self.page_size, self.cart, self.phrasing = page_size, cart, phrasing
        kwargs = {"products": products, "attributes": attributes, "options": options, "price_limit": price_limit,
                  "page_size": page_size, "cart": cart, "phrasing": phrasing, "tools": tools, "click": click}
        # click joined later: versions written before it existed stay the same when it is left at "id".
        shown = ",".join(f"{k}={'+'.join(v) if k == 'tools' else v}" for k, v in kwargs.items()
                         if k != "click" or v != "id")
        self.task_version = self.version if kwargs == DEFAULTS else f"{self.version}({shown})"
        self.key = next(_env_keys)
        self.site: ShopSite | None = None
        self.sid = ""
        self.history: list[str] = []  # URLs visited, the current page last
        self._cleanup: weakref.finalize | None = None

    # --- episode side -------------------------------------------------------------------------
    def reset(self, task: Task) -> list[Message]:
        messages = super().reset(task)
        if self.site is None:
            self.site = ShopSite()
            # Environments the rollout engine drops without close() still give their page back.
            self._cleanup = weakref.finalize(self, _cleanup, self.site, self.key)
        elif self.sid:
            self.site.forget(self.sid)
        self.sid = self.site.open(task.data["shop"])
        self.history = [self.site.home(self.sid)]
        return messages

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # stops the site, gives the page back
        self.site, self._cleanup, self.task, self.sid = None, None, None, ""

    @tool
    def search(self, query: str) -> str:
        """Search the shop for products; shows the first page of results.

        Args:
            query: words to look for, e.g. "shirt".
        """
        if not query.strip():
            raise ToolError("the query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise ToolError(f"the query is longer than {MAX_QUERY_CHARS} characters")

        async def act(page: Any) -> None:
            if page.url != self.site.home(self.sid):
                await page.goto(self.site.home(self.sid))
            await page.fill("input[name=q]", query)
            await page.click("form button[type=submit]")

        return self._browse(act)

    @tool
    def click(self, id: int) -> str:
        """Click an element of the page by its id, e.g. a product link, an option or a button.

        Args:
            id: the number in brackets before the element, e.g. 3 for [3].
        """
        async def act(page: Any) -> None:
            if await page.locator(f'[data-eid="{id}"]').count() == 0:
                raise ToolError(f"no element [{id}] on this page")
            await _click_element(page, id, f"element [{id}]")

        return self._browse(act)

    def click_text(self, text: str) -> str:
        """Click a link or button of the page by its text, e.g. a product, an option or "Buy".

        Args:
            text: the element's text, or its first words, e.g. "red shirt" for "red shirt $24".
        """
        wanted = " ".join(text.lower().split())
        if not wanted:
            raise ToolError("the text is empty")

        async def act(page: Any) -> None:
            elements = [(int(eid), json.loads(label)) for eid, kind, label in ELEMENT.findall(
                await page.evaluate(RENDER_JS)) if kind != "textbox"]
            labels = [(eid, " ".join(label.lower().split())) for eid, label in elements]
            found = ([eid for eid, label in labels if label == wanted]
                     or [eid for eid, label in labels if label.startswith(wanted + " ")])
            if len(found) != 1:
                shown = ", ".join(json.dumps(label) for _, label in elements)
                problem = "no element has" if not found else f"{len(found)} elements have"
                raise ToolError(f"{problem} the text {json.dumps(text)}; you can click: {shown}")
            await _click_element(page, found[0], f"the element with the text {json.dumps(text)}")

        return self._browse(act)

    def back(self) -> str:
        """Go back to the previous page."""
        if len(self.history) < 2:
            raise ToolError("there is no previous page")
        self.history.pop()

        async def act(page: Any) -> None:
            pass  # _browse opens the (now) current URL

        return self._browse(act)

    def read(self) -> str:
        """Show the current page again."""
        return self._browse(None)

    def _browse(self, act: Any) -> str:
        """Open the current URL (if the page is not on it), run ``act``, then record and render the page."""
        async def run(page: Any) -> tuple[str, str]:
            if page.url != self.history[-1]:
                await page.goto(self.history[-1])
            if act is not None:
                await act(page)
                await page.wait_for_load_state("load")
            return page.url, await page.evaluate(RENDER_JS)

        host = browser_host()
        url, text = host.call(host.with_page, self.key, run)
        if url != self.history[-1]:
            self.history.append(url)
        if self.click_by == "text":  # only the ids RENDER_JS writes, not a "[3] " the page's text holds
            text = ELEMENT.sub(r"\2 \3", text)
        orders = self.site.orders(self.sid)
        if orders:
            reward = score_order(orders[0], self.task.data["goal"])
            self.finish(reward=reward, success=reward == 1.0)
        return text

    # --- task side ----------------------------------------------------------------------------
    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        for _ in range(MAX_DRAWS):
            goal = {"category": rng.choice(CATEGORIES),
                    "attrs": {name: rng.choice(values) for name, values in ATTRIBUTES[:self.attributes]},
                    "options": {name: rng.choice(values) for name, values in OPTIONS[:self.options]},
                    "max_price": rng.choice(LIMITS) if self.price_limit else None}
            prompt = self._prompt(goal, rng)
            # The split is decided by what is asked (the wording aside), so a test request never reaches
            # training phrased another way.
            if in_test_split(self._request(goal)) == (split == "test"):
                break
        else:  # pragma: no cover - 8 categories x 8 colours x 4 sizes is already 256 requests
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        shop = self._shop(goal, rng)
        return Task(env=self.name, split=split, index=index, prompt=prompt, data={"goal": goal, "shop": shop},
                    version=self.task_version)

    def _request(self, goal: dict, phrasing: str = "plain") -> str:
        """What is asked, in words, with the quotes of ``phrasing`` ("quoted": each value, "title": the title)."""
        q = '"{}"'.format if phrasing in ("quoted", "title") else str
        item = q(title_of(goal)) if phrasing == "title" else " ".join(q(word) for word in title_of(goal).split())
        if "size" in goal["options"]:
            item += f" in size {q(goal['options']['size'])}"
        if "fit" in goal["options"]:
            item += f" with a {q(goal['options']['fit'])} fit"
        if goal["max_price"] is not None:
            item += f" under {goal['max_price']} dollars"
        return item

    def _prompt(self, goal: dict, rng: random.Random) -> str:
        template = rng.choice(TEMPLATES) if self.phrasing == "varied" else TEMPLATES[0]
        return template.format(item=self._request(goal, self.phrasing))

    def _shop(self, goal: dict, rng: random.Random) -> dict:
        """The wanted product and near misses, each wrong in one thing, plus products of other kinds."""
        def product(category: str, attrs: dict, price: int, wanted: dict) -> dict:
            options = {}
            for name, values in OPTIONS[:self.options]:
                offered = set(rng.sample(values, len(values) - 1))
                offered.add(wanted.get(name, rng.choice(values)))
                options[name] = [v for v in values if v in offered]
            return {"category": category, "attrs": attrs, "price": price, "options": options}

        limit = goal["max_price"]
        cheap = (lambda: rng.randint(max(5, limit - 15), limit - 1)) if limit else (lambda: rng.randint(10, 60))
        wanted = product(goal["category"], dict(goal["attrs"]), cheap(), goal["options"])
        same = self.products - 1 - (self.products - 1) // 3  # near misses of the same kind: shown by its search
        faults = ["colour", "material"][: self.attributes] + (["price"] if limit else [])
        used: dict[str, set] = {"colour": {goal["attrs"]["colour"]}, "material": {goal["attrs"].get("material")}}
        catalogue = [wanted]
        for i in range(self.products - 1):
            attrs = dict(goal["attrs"])
            if i < same:
                fault, category, price = faults[i % len(faults)], goal["category"], cheap()
                if fault == "price":
                    price = rng.randint(limit, limit + 20)
                else:
                    pool = COLOURS if fault == "colour" else MATERIALS
                    fresh = [v for v in pool if v not in used[fault]] or [v for v in pool if v != attrs[fault]]
                    attrs[fault] = rng.choice(fresh)
                    used[fault].add(attrs[fault])
            else:
                category = rng.choice([c for c in CATEGORIES if c != goal["category"]])
                attrs = {name: rng.choice(values) for name, values in ATTRIBUTES[:self.attributes]}
                price = cheap() if rng.random() < 0.5 else rng.randint(10, 99)
            catalogue.append(product(category, attrs, price, {}))
        rng.shuffle(catalogue)
        return self._with_ids(catalogue, rng)

    def _with_ids(self, catalogue: list[dict], rng: random.Random) -> dict:
        """Product numbers and element ids: random, distinct, one token each (integers 1-999)."""
        needed = 5 + sum(2 + sum(len(v) for v in p["options"].values()) for p in catalogue)
        eids = iter(rng.sample(range(1, 100 if needed < 60 else 1000), needed))
        for pid, item in enumerate(catalogue, 1):
            item["pid"] = pid
            item["title"] = title_of(item)
            item["eid"], item["buy_eid"] = next(eids), next(eids)
            item["option_eids"] = {name: {v: next(eids) for v in values} for name, values in item["options"].items()}
        return {"products": catalogue, "page_size": self.page_size, "cart": self.cart,
                "eids": {name: next(eids) for name in ("query", "go", "next", "prev", "checkout")}}

    def oracle(self, task: Task) -> list[ToolCall]:
        goal, shop = task.data["goal"], task.data["shop"]
        # With the title quoted the oracle searches for all of it (the wanted product comes first) and clicks
        # it by the whole title; otherwise it searches for the category.
        title = title_of(goal)
        query = title if self.phrasing == "title" else goal["category"]
        found = search_products(shop["products"], query)
        target = next(p for p in found if score_order([{**p, "options": goal["options"]}], goal) == 1.0)
        pages = found.index(target) // shop["page_size"]
        if self.click_by == "text":
            # The fewest first words of the product's link that no other link of its results page starts with
            # (at least the whole title when the instruction quotes it): the colour alone when it tells the
            # products apart, the title and price when a near miss over the price limit has the same title.
            shown = found[pages * shop["page_size"]:(pages + 1) * shop["page_size"]]
            label = link_text(target).split()
            others = [link_text(p).split() for p in shown if p is not target]
            fewest = len(title.split()) if self.phrasing == "title" else 1
            words = next(n for n in range(fewest, len(label) + 1) if all(o[:n] != label[:n] for o in others))
            clicks = ["Next"] * pages + [" ".join(label[:words]), *goal["options"].values()]
            clicks += ["Add to cart", "Checkout"] if shop["cart"] else ["Buy"]
            return [ToolCall("search", {"query": query}), *(ToolCall("click", {"text": t}) for t in clicks)]
        calls = [ToolCall("search", {"query": query})]
        calls += [ToolCall("click", {"id": shop["eids"]["next"]})] * pages
        calls.append(ToolCall("click", {"id": target["eid"]}))
        calls += [ToolCall("click", {"id": target["option_eids"][k][v]}) for k, v in goal["options"].items()]
        calls.append(ToolCall("click", {"id": target["buy_eid"]}))
        if shop["cart"]:
            calls.append(ToolCall("click", {"id": shop["eids"]["checkout"]}))
        return calls


_env_keys = itertools.count(1)


async def _click_element(page: Any, eid: int, name: str) -> None:
    from playwright.async_api import TimeoutError as ClickTimeout

    try:
        await page.locator(f'[data-eid="{eid}"]').first.click()
    except ClickTimeout:  # covered, disabled or moving: the model's mistake, not the browser's
        raise ToolError(f"{name} cannot be clicked") from None


def _cleanup(site: ShopSite, key: int) -> None:
    site.close()
    release_page(key)
