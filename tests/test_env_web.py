"""The web shop environment, driven through a real headless Chromium against the real local site.

Chromium must be installed (`bash launch/setup_browser.sh`); without it the browser tests fail, they do not
skip. The whole-split oracle runs are marked slow (about a second per episode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import environments.web_browser as web_browser
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.types import ToolCall
from environments.web import EASY, WebShopEnv, score_order
from environments.web_browser import browser_host, shutdown_browser
from environments.web_shop_site import search_products
from tests.env_checks import (
    assert_oracle_solves, assert_served_like_in_process, assert_tasks_identical_across_processes, play
)

ROOT = Path(__file__).resolve().parents[1]
# the easy preset before session 12: unquoted instructions, and the model copies element ids
EASY_IDS = {**EASY, "click": "id", "phrasing": "plain"}
# session 12's easy preset: every value quoted on its own; the oracle searches the category, clicks the colour
EASY_QUOTED = {**EASY, "phrasing": "quoted"}
# the whole title quoted, at the default settings: price near misses share the title, results run to Next pages
TITLE = {"phrasing": "title", "click": "text"}
SETTINGS = [pytest.param({}, id="default"), pytest.param(EASY, id="easy"), pytest.param(EASY_IDS, id="easy_ids"),
            pytest.param(EASY_QUOTED, id="easy_quoted"), pytest.param(TITLE, id="title")]
SLOW_DEFAULT = [pytest.param({}, id="default", marks=pytest.mark.slow), pytest.param(EASY_IDS, id="easy_ids")]


@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.fail("Chromium is not installed; install it with `bash launch/setup_browser.sh` "
                    "(apt-get install -y chromium)", pytrace=False)
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("Playwright is not installed: pip install playwright==1.65.2", pytrace=False)
    yield
    shutdown_browser()


def click(eid):
    return ToolCall("click", {"id": eid})


# --- tasks (no browser) ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_tasks_are_deterministic_and_varied(kwargs):
    env = WebShopEnv(**kwargs)
    assert env.tasks("test", 20) == WebShopEnv(**kwargs).tasks("test", 20)
    assert env.tasks("train", 20, start=5000) == WebShopEnv(**kwargs).tasks("train", 20, start=5000)
    prompts = [t.prompt for t in env.tasks("train", 100)]
    assert len(set(prompts)) > 60 and len(env.tasks("test")) == 50


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("environments.web:WebShopEnv", [{}, EASY, EASY_IDS, EASY_QUOTED], 20)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_train_and_test_do_not_share_requests(kwargs):
    env = WebShopEnv(**kwargs)
    request = lambda t: json.dumps(t.data["goal"], sort_keys=True)  # noqa: E731 - what is asked, any wording
    train, test = env.tasks("train", 2000), env.tasks("test")
    assert not {request(t) for t in train} & {request(t) for t in test}
    assert not {t.prompt for t in train} & {t.prompt for t in test}


def test_settings_shape_tasks_and_version():
    assert WebShopEnv().task_version == "web-v1"
    easy = WebShopEnv(**EASY)
    assert easy.task_version == ("web-v1(products=3,attributes=1,options=1,price_limit=False,page_size=5,"
                                 "cart=False,phrasing=title,tools=search+click,click=text)")
    assert WebShopEnv(**EASY_QUOTED).task_version == easy.task_version.replace("=title", "=quoted")
    # click came later: left at "id", it does not change the versions written before it
    assert WebShopEnv(**EASY_IDS).task_version == ("web-v1(products=3,attributes=1,options=1,price_limit=False,"
                                                   "page_size=5,cart=False,phrasing=plain,tools=search+click)")
    assert WebShopEnv(click="id").task_version == "web-v1"
    # how the model clicks and the quotes change the tool, the system prompt and the instruction's quotes,
    # not what is asked or the shop
    by_ids = WebShopEnv(**EASY_IDS)
    assert [(t.prompt, t.data) for t in by_ids.tasks("test", 10)] == [(t.prompt.replace('"', ""), t.data)
                                                                      for t in easy.tasks("test", 10)]
    assert [t["function"]["name"] for t in easy.tools()] == ["click", "search"]
    assert list(easy.tools()[0]["function"]["parameters"]["properties"]) == ["text"]
    assert list(by_ids.tools()[0]["function"]["parameters"]["properties"]) == ["id"]
    assert "text" in easy.system_prompt and "ids" in by_ids.system_prompt
    assert sorted(t["function"]["name"] for t in WebShopEnv().tools()) == ["back", "click", "read", "search"]
    task = easy.task_at("train", 0)
    goal = task.data["goal"]
    assert task.prompt == f'Buy a "{goal["attrs"]["colour"]} {goal["category"]}" in size "{goal["options"]["size"]}".'
    quoted = WebShopEnv(**EASY_QUOTED).task_at("train", 0)
    assert quoted.prompt == f'Buy a "{goal["attrs"]["colour"]}" "{goal["category"]}" in size "{goal["options"]["size"]}".'
    assert quoted.data == task.data  # the quotes change the words around what is asked, not the task
    full = WebShopEnv(phrasing="quoted").task_at("train", 0)
    assert re.fullmatch(r'Buy a "\w+" "\w+" "\w+" in size "\w+" with a "\w+" fit under \d+ dollars\.', full.prompt)
    full = WebShopEnv(phrasing="title").task_at("train", 0)
    assert re.fullmatch(r'Buy a "\w+ \w+ \w+" in size "\w+" with a "\w+" fit under \d+ dollars\.', full.prompt)
    assert len(task.data["shop"]["products"]) == 3 and task.version == easy.task_version
    assert WebShopEnv(**{**EASY, "tools": ["click", "search"]}).tasks("train", 5) == easy.tasks("train", 5)
    for bad in ({"attributes": 3}, {"options": 3}, {"products": 1}, {"page_size": 0}, {"phrasing": "poem"},
                {"tools": ["click"]}, {"tools": ["search", "click", "type"]}, {"click": "label"}):
        with pytest.raises(ValueError):
            WebShopEnv(**bad)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_each_shop_has_exactly_one_product_that_fully_matches(kwargs):
    env = WebShopEnv(**kwargs)
    for task in env.tasks("train", 300):
        goal, shop = task.data["goal"], task.data["shop"]
        full = [p for p in shop["products"] if score_order([{**p, "options": goal["options"]}], goal) == 1.0
                and all(v in p["options"][k] for k, v in goal["options"].items())]
        assert len(full) == 1, task.id
        eids = [shop["eids"][k] for k in shop["eids"]] + [e for p in shop["products"] for e in
                [p["eid"], p["buy_eid"], *(i for o in p["option_eids"].values() for i in o.values())]]
        assert len(set(eids)) == len(eids) and all(1 <= e <= 999 for e in eids)
        assert all(p in search_products(shop["products"], goal["category"]) for p in full)


def test_score_order_gives_partial_credit():
    goal = {"category": "shirt", "attrs": {"colour": "red", "material": "wool"}, "options": {"size": "m"},
            "max_price": 30}
    item = {"category": "shirt", "attrs": {"colour": "red", "material": "wool"}, "options": {"size": "m"},
            "price": 29}
    assert score_order([item], goal) == 1.0
    assert score_order([{**item, "price": 30}], goal) == 0.75  # "under 30 dollars"
    assert score_order([{**item, "options": {}}], goal) == 0.75
    assert score_order([{**item, "attrs": {"colour": "blue", "material": "silk"}}], goal) == 0.5
    assert score_order([{**item, "category": "hat"}], goal) == 0.0
    assert score_order([item, {**item, "category": "hat"}], goal) == 0.5  # extras cost reward
    assert score_order([], goal) == 0.0


def test_site_answers_bad_requests_without_failing():
    from environments.web_shop_site import ShopSite

    shop = WebShopEnv(**EASY).task_at("test", 0).data["shop"]
    site = ShopSite()
    sid = site.open(shop)
    base = site.home(sid)

    def fetch(path, data=None, headers=None):
        request = urllib.request.Request(base + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        for path in ["item/999", "item/" + "9" * 5000, "item/%D9%A3", "order/1", "cart", "nope", "item/1/x",
                     "../../etc/passwd", "buy"]:
            assert fetch(path)[0] == 404, path
        assert fetch("search?q=x&page=" + "9" * 5000)[0] == 200
        assert fetch("search?q=%3Cscript%3E")[1].count("<script>") == 0
        for data in [b"pid=abc", b"pid=" + b"9" * 5000, b"", b"pid=1&size=\xff"]:
            assert fetch("add", data)[0] == 404 and fetch("checkout", data)[0] == 404  # no cart in this shop
        assert fetch("buy", b"pid=1", {"Content-Length": "-5"})[0] == 413
        assert fetch("buy", b"x" * 20_000)[0] == 413
        assert fetch("../999/")[0] == 404  # another session's pages
        assert site.orders(sid) == []
        status, page = fetch("buy", b"pid=1&size=nonsense")  # an option value the product lacks is dropped
        assert status == 200 and site.orders(sid)[0][0]["options"] == {}
    finally:
        site.close()


# --- the browser ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_oracle_solves_a_test_task(browser, kwargs):
    env = WebShopEnv(**kwargs)
    for task in env.tasks("test", 1, start=1):
        results = play(env, task, env.oracle(task))
        assert [r.done for r in results] == [False] * (len(results) - 1) + [True], task.id
        assert results[-1].reward == 1.0 and env.info["success"] and env.info["tool_errors"] == 0, task.id
        assert results[-1].observation.startswith("Order placed")
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_oracle_solves_the_whole_test_split(browser, kwargs):
    env = WebShopEnv(**kwargs)
    assert_oracle_solves(env, env.tasks("test"))
    env.close()


def test_easy_episode_reads_as_compact_text(browser):
    env = WebShopEnv(**EASY_IDS)
    task = env.task_at("test", 0)
    goal, shop = task.data["goal"], task.data["shop"]
    target = next(p for p in shop["products"] if p["title"] == f"{goal['attrs']['colour']} {goal['category']}")
    results = play(env, task, env.oracle(task))
    lines = results[0].observation.splitlines()
    assert lines[0] == f'Results for "{goal["category"]}"' and len(lines) == 4
    assert f'[{target["eid"]}] link "{target["title"]} ${target["price"]}"' in lines
    size = goal["options"]["size"]
    assert f'[{target["option_eids"]["size"][size]}] link "{size}" (selected)' in results[2].observation
    assert results[2].observation.endswith(f'[{target["buy_eid"]}] button "Buy"')
    assert len(env.oracle(task)) == 4 and all(len(r.observation) < 200 for r in results)
    env.close()


def shop_with_a_shared_title(env):
    """A train task whose shop has a near miss over the price limit with the wanted title, and that title."""
    for task in env.tasks("train", 40):
        goal = task.data["goal"]
        title = f'{goal["attrs"]["colour"]} {goal["category"]}'
        if sum(p["title"] == title for p in task.data["shop"]["products"]) > 1:
            return task, title
    pytest.fail("no shop with two products of the goal's title in 40 tasks")


@pytest.mark.parametrize("kwargs", [pytest.param(EASY, id="easy"), pytest.param(EASY_QUOTED, id="easy_quoted")])
def test_clicks_by_text_copy_the_instruction_and_pages_show_no_ids(browser, kwargs):
    env = WebShopEnv(**kwargs)
    for task in env.tasks("test", 3):
        goal = task.data["goal"]
        title = f'{goal["attrs"]["colour"]} {goal["category"]}'
        calls = env.oracle(task)
        # every argument is a quoted phrase of the instruction, or "Buy": the title, searched for and clicked,
        # or (each value quoted alone) the category searched for and the colour that tells the products apart
        by_title = kwargs["phrasing"] == "title"
        product = ([{"query": title}, {"text": title}] if by_title
                   else [{"query": goal["category"]}, {"text": goal["attrs"]["colour"]}])
        assert [c.arguments for c in calls] == [*product, {"text": goal["options"]["size"]}, {"text": "Buy"}]
        assert all(f'"{value}"' in task.prompt for c in calls[:-1] for value in c.arguments.values())
        results = play(env, task, calls)
        assert not any(re.search(r"\[\d+\]", r.observation) for r in results)
        assert results[-1].done and results[-1].reward == 1.0 and env.info["success"]
        if by_title:  # all of the title finds the wanted product first
            assert results[0].observation.splitlines()[1].startswith(f'link "{title} $')
        assert results[1].observation.endswith('button "Buy"') and f'link "{goal["options"]["size"]}"' in \
            results[1].observation
    env.close()


def test_title_oracle_clicks_title_and_price_when_a_near_miss_shares_the_title(browser):
    env = WebShopEnv(products=12, attributes=1, options=0, price_limit=True, page_size=12, cart=False,
                     phrasing="title", click="text")
    task, title = shop_with_a_shared_title(env)
    goal = task.data["goal"]
    calls = env.oracle(task)
    target = next(p for p in task.data["shop"]["products"] if p["title"] == title and p["price"] < goal["max_price"])
    assert [c.arguments for c in calls] == [{"query": title}, {"text": f'{title} ${target["price"]}'}, {"text": "Buy"}]
    assert play(env, task, calls)[-1].reward == 1.0 and env.info["success"]
    env.close()


def test_click_by_text_rewards_and_errors(browser):
    env = WebShopEnv(**EASY)
    task = env.task_at("test", 4)
    goal, shop = task.data["goal"], task.data["shop"]
    target = next(p for p in shop["products"] if score_order([{**p, "options": goal["options"]}], goal) == 1.0)
    other = next(p for p in search_products(shop["products"], goal["category"]) if p is not target)
    wrong_size = next(v for v in target["options"]["size"] if v != goal["options"]["size"])
    text = lambda words: ToolCall("click", {"text": words})  # noqa: E731
    search = ToolCall("search", {"query": goal["category"]})
    cases = [  # (calls, reward): any case, extra spaces and the full label also find the element
        ([search, text(f'{target["title"]} ${target["price"]}'), text(goal["options"]["size"]), text("buy")], 1.0),
        ([search, text("  " + target["title"].upper()), text(wrong_size), text("Buy")], 0.5),
        ([search, text(target["title"]), text("Buy")], 0.5),  # no size chosen
        ([search, text(other["title"]), text("Buy")], 0.0),  # a near miss, wrong colour, no size
    ]
    for calls, reward in cases:
        results = play(env, task, calls)
        assert results[-1].done and results[-1].reward == reward and not any(r.done for r in results[:-1]), calls
        assert all(not r.observation.startswith("Error") for r in results), calls
    env.reset(task)
    listing = env.step(search).observation
    # a prefix in the middle of a word, an element of another page, a number, nothing: errors that list the choices
    for words in ("blu", "Buy", "3", goal["category"] + " $"):
        shown = env.step(text(words)).observation
        assert shown.startswith(f'Error: no element has the text "{words}"; you can click: "'), shown
        assert all(f'"{label}"' in shown for label in re.findall(r'link "([^"]*)"', listing)), shown
    assert env.step(text("")).observation == "Error: the text is empty"
    # the page's own text keeps its brackets; only the element ids are left out
    assert env.step(ToolCall("search", {"query": "[12] shirt"})).observation.startswith('Results for "[12] shirt"')
    assert env.step(ToolCall("click", {"id": 3})).observation == (
        "Error: click got unknown argument(s) ['id']; it takes ['text']")
    assert not env.done and env.info["tool_errors"] == 6
    env.close()
    # two links share the title when a near miss is over the price limit: the title alone is ambiguous
    env = WebShopEnv(products=12, attributes=1, options=0, price_limit=True, page_size=12, click="text")
    task, title = shop_with_a_shared_title(env)
    env.reset(task)
    env.step(ToolCall("search", {"query": task.data["goal"]["category"]}))
    ambiguous = env.step(text(title)).observation
    assert re.match(rf'Error: [2-9] elements have the text "{title}"; you can click: ', ambiguous), ambiguous
    assert play(env, task, env.oracle(task))[-1].reward == 1.0
    env.close()


def wrong_answers(env, task):
    """(calls, reward, success) for hand-made episodes: right, partial and wrong purchases."""
    goal, shop = task.data["goal"], task.data["shop"]
    found = search_products(shop["products"], goal["category"])
    target = next(p for p in found if score_order([{**p, "options": goal["options"]}], goal) == 1.0)
    other = next(p for p in found if p is not target and (p["title"] != target["title"]))
    buy = [click(target["buy_eid"])] + ([click(shop["eids"]["checkout"])] if shop["cart"] else [])
    size = goal["options"]["size"]
    wrong_size = next(v for v in target["options"]["size"] if v != size)
    open_target = env.oracle(task)[: -len(buy) - len(goal["options"])]  # search, Next..., the product
    checks = len(goal["options"]) + len(goal["attrs"]) + (goal["max_price"] is not None)
    others = [click(target["option_eids"][k][v]) for k, v in goal["options"].items() if k != "size"]
    cases = [(open_target + [click(target["option_eids"]["size"][size])] * 2 + others + buy,  # twice is harmless
              1.0, True),
             (open_target + buy, 1 - len(goal["options"]) / checks, False),  # no option chosen
             (open_target + [click(target["option_eids"]["size"][wrong_size])] + others + buy, 1 - 1 / checks, False)]
    if not shop["cart"]:  # a near miss (one thing wrong), bought without choosing options
        page = found.index(other) // shop["page_size"]
        calls = [ToolCall("search", {"query": goal["category"]})] + [click(shop["eids"]["next"])] * page
        cases.append((calls + [click(other["eid"]), click(other["buy_eid"])],
                      1 - (1 + len(goal["options"])) / checks, False))
    return cases


@pytest.mark.parametrize("kwargs", SLOW_DEFAULT)
def test_rewards_for_right_partial_and_wrong_purchases(browser, kwargs):
    env = WebShopEnv(**kwargs)
    task = env.task_at("test", 4)
    for calls, reward, success in wrong_answers(env, task):
        results = play(env, task, calls)
        assert results[-1].done and [r.done for r in results[:-1]] == [False] * (len(results) - 1)
        bought = env.site.orders(env.sid)[0]
        assert results[-1].reward == score_order(bought, task.data["goal"]), calls
        assert results[-1].reward == pytest.approx(reward), calls
        assert (results[-1].reward == 1.0) == success == env.info["success"], calls
    env.close()


def test_cart_checkout_with_extras_and_an_empty_cart(browser):
    env = WebShopEnv(products=6, attributes=1, options=1, price_limit=False, page_size=10)
    task = env.task_at("train", 7)
    goal, shop = task.data["goal"], task.data["shop"]
    oracle = env.oracle(task)  # search, the product, its size, Add to cart, Checkout
    target = next(p for p in shop["products"] if p["eid"] == oracle[1].arguments["id"])
    other = next(p for p in shop["products"] if p["category"] != goal["category"])
    env.reset(task)
    # the site refuses to check out an empty cart
    page = urllib.request.urlopen(urllib.request.Request(env.site.home(env.sid) + "checkout", data=b"")).read()
    assert b"Your cart is empty" in page and env.site.orders(env.sid) == []
    # an extra item in the cart, then the wanted one: the order holds both
    extra = [env.step(c) for c in [ToolCall("search", {"query": other["category"]}), click(other["eid"]),
                                   click(other["buy_eid"])]]
    assert extra[-1].observation.startswith("Cart\n") and extra[-1].observation.endswith('button "Checkout"')
    assert not extra[-1].done
    results = [env.step(c) for c in oracle]
    assert results[-1].done and results[-1].observation.startswith("Order placed")
    assert [i["pid"] for i in env.site.orders(env.sid)[0]] == [other["pid"], target["pid"]]
    assert results[-1].reward == 0.5 and not env.info["success"]  # mean of 0 (wrong kind) and 1
    env.close()


def test_reward_comes_from_the_sites_record_of_the_order(browser):
    env = WebShopEnv(**EASY_IDS)
    task = env.task_at("test", 2)
    env.reset(task)
    target = next(p for p in task.data["shop"]["products"] if p["eid"] == env.oracle(task)[1].arguments["id"])
    first = env.step(ToolCall("search", {"query": "nothing"}))
    assert first.observation.endswith("No products found.") and not first.done
    # An order the site receives by other means than the tools still ends the episode with its reward.
    form = urllib.parse.urlencode({"pid": target["pid"], "size": task.data["goal"]["options"]["size"]}).encode()
    urllib.request.urlopen(urllib.request.Request(env.site.home(env.sid) + "buy", data=form))
    last = env.step(ToolCall("search", {"query": "anything"}))
    assert last.done and last.reward == 1.0 and env.info["success"]
    env.close()


def bad_calls(env, task):
    shop = task.data["shop"]
    return [ToolCall("nope", {}), ToolCall("click", {}), ToolCall("click", {"id": "abc"}),
            ToolCall("click", {"id": 1.5}), ToolCall("click", {"id": [1]}), ToolCall("click", {"id": 3, "x": 1}),
            ToolCall("search", {}), ToolCall("search", {"query": 5}), ToolCall("search", {"query": ""}),
            ToolCall("search", {"query": "   "}), ToolCall("search", {"query": "shirt " * 1000}),
            ToolCall("click", {"id": 0}), ToolCall("click", {"id": -1}), ToolCall("click", {"id": 10**12}),
            click(shop["products"][0]["buy_eid"]),  # on another page
            ToolCall("back", {}), ToolCall("back", {"steps": 2})]


def test_bad_calls_are_error_observations(browser):
    env = WebShopEnv()
    task = env.task_at("test", 1)
    calls = bad_calls(env, task)
    results = play(env, task, calls)
    for call, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, call
    assert not env.done and env.info["tool_errors"] == len(calls)
    # markup and script in a query are shown as text, not run
    hostile = '<script>document.body.innerHTML="pwned"</script><b>bold</b> "quoted" \u00e9'
    shown = env.step(ToolCall("search", {"query": hostile}))
    assert shown.observation == f'Results for "{hostile}"\nNo products found.'
    assert env.step(ToolCall("read", {})) == shown
    assert env.step(ToolCall("back", {})).observation.endswith('button "Search"')  # the start page
    final = [env.step(call) for call in env.oracle(task)][-1]  # the episode is still playable
    assert final.done and env.info["success"]
    after = env.step(env.oracle(task)[-1])
    assert after.observation.startswith("Error: ") and "finished" in after.observation
    env.close()


def test_pages_render_as_compact_text(browser):
    page = """<html><head><style>.gone {display: none}</style><script>var x = 1;</script></head><body>
      <h1>Title  with   spaces</h1><p>Some <b>bold</b> text and <a href="/x" data-eid="7">a link</a>.</p>
      <div class="gone"><button data-eid="8">Hidden</button>invisible</div>
      <div><input type="hidden" name="h" value="secret"><input type="text" value="typed"></div>
      <div><label><input type="checkbox" checked> Keep me</label> <input type="radio" id="r"><label for="r">Pick</label>
      </div><button aria-pressed="true">On</button><input type="submit" value="Send"><span>plain "quoted"</span>
    </body></html>"""

    async def render(html):
        async def on(page):
            await page.set_content(html)
            return await page.evaluate(web_browser.RENDER_JS)
        return await browser_host().with_page(-1, on)

    host = browser_host()
    text = host.call(render, page)
    host.release(-1)
    assert text.splitlines() == [
        "Title with spaces",
        'Some bold text and [7] link "a link" .',
        '[9] textbox "typed"',  # numbered after the largest data-eid
        '[10] checkbox "Keep me" (checked) [11] radio "Pick"',
        '[12] button "On" (selected) [13] button "Send" plain "quoted"',
    ]


@pytest.mark.slow
def test_back_and_read_navigate_the_real_history(browser):
    env = WebShopEnv()
    task = env.task_at("test", 3)
    oracle = env.oracle(task)
    to_product = oracle[: len(oracle) - len(task.data["goal"]["options"]) - 2]  # search, Next..., the product
    env.reset(task)
    seen = [env.step(ToolCall("read", {})).observation]
    assert seen[0].startswith("[") and seen[0].endswith('button "Search"')  # the search form
    seen += [env.step(call).observation for call in to_product]
    assert seen[-1].splitlines()[0] == next(p["title"] for p in task.data["shop"]["products"]
                                            if p["eid"] == to_product[-1].arguments["id"])
    for page in reversed(seen[:-1]):
        assert env.step(ToolCall("back", {})).observation == page
    assert env.step(ToolCall("back", {})).observation == "Error: there is no previous page"
    env.close()


@pytest.mark.parametrize("kwargs, n", [pytest.param(EASY, 1, id="easy"),
                                       pytest.param({}, 3, id="default", marks=pytest.mark.slow)])
def test_oracle_episodes_through_remote_env_match_in_process(browser, kwargs, n):
    service = EnvService(env_factories([("environments.web:WebShopEnv", kwargs)]))
    with serve_in_thread(service) as url:

        def solved(local_env):
            assert local_env.done and local_env.reward == 1.0

        # whole conversations (as SFT traces are made) only in the slow run: each is a browser session
        assert_served_like_in_process(url, "web", lambda: WebShopEnv(**kwargs), WebShopEnv(**kwargs).tasks("test", n),
                                      [ToolCall("nosuch", {}), click(0), ToolCall("search", {"query": ""})],
                                      [click(1)], conversations=n > 1, n_listed=3, check=solved)


def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command) of every process that is not a zombie."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:  # it exited meanwhile
                continue
            state, parent = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                out[int(entry)] = (int(parent), command)
    return out


def browser_processes() -> tuple[set[int], set[int]]:
    """(this process's descendants, every Chromium or Playwright-driver process on the machine)."""
    procs = live_processes()
    mine, todo = set(), [os.getpid()]
    while todo:
        parent = todo.pop()
        kids = [pid for pid, (ppid, _) in procs.items() if ppid == parent]
        mine.update(kids)
        todo += kids
    browsers = {pid for pid, (_, command) in procs.items() if "chrom" in command or "playwright" in command}
    return mine, browsers


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_browser_is_shared_started_lazily_and_closed_after_the_last_close(browser, monkeypatch):
    monkeypatch.setattr(web_browser, "GRACE_S", 0.3)
    shutdown_browser()
    host = browser_host()
    mine_before, browsers_before = browser_processes()
    starts = host.starts
    first, second = WebShopEnv(**EASY), WebShopEnv()
    first.reset(first.task_at("test", 0))
    assert not host.running()  # reset alone starts no browser
    for env, index in ((first, 0), (second, 0), (first, 1)):
        task = env.task_at("test", index)
        env.reset(task)
        env.step(env.oracle(task)[0])
    mine_during, browsers_during = browser_processes()
    assert host.running() and host.starts == starts + 1  # one browser for both environments
    assert len(mine_during - mine_before) >= 3  # the driver, the browser and its helpers
    first.close()
    time.sleep(0.6)
    assert host.running()  # the second environment still holds a page
    second.close()
    assert wait_for(lambda: not host.running(), 10)
    assert wait_for(lambda: browser_processes()[0] <= mine_before, 10), "the browser's processes outlived it"
    started = browsers_during - browsers_before
    assert wait_for(lambda: not started & browser_processes()[1], 10)


def test_environment_dropped_without_close_gives_its_page_back(browser):
    host = browser_host()
    env = WebShopEnv(**EASY)
    task = env.task_at("test", 0)
    play(env, task, env.oracle(task)[:1])
    key = env.key
    del env
    gc.collect()
    assert wait_for(lambda: key not in host.call(_holders, host), 5)


async def _holders(host):
    return set(host._holders)


@pytest.mark.slow
def test_pages_lent_to_other_environments_are_reopened(browser, monkeypatch):
    monkeypatch.setattr(web_browser, "MAX_PAGES", 1)
    shutdown_browser()
    envs = [WebShopEnv(**EASY) for _ in range(3)]
    tasks = [env.task_at("test", i) for i, env in enumerate(envs)]
    for env, task in zip(envs, tasks):
        env.reset(task)
    for turn in range(4):  # round robin: each step finds its page taken by the previous environment
        for env, task in zip(envs, tasks):
            result = env.step(env.oracle(task)[turn])
    assert all(env.done and env.reward == 1.0 for env in envs) and result.done
    for env in envs:
        env.close()


def test_steps_from_worker_threads_and_inside_an_event_loop(browser):
    env = WebShopEnv(**EASY)
    task = env.task_at("test", 5)
    env.reset(task)
    calls = env.oracle(task)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert not pool.submit(env.step, calls[0]).result().done
        assert not pool.submit(env.step, calls[1]).result().done

    async def in_loop():  # as the rollout engine steps in-process environments
        return [env.step(call) for call in calls[2:]]

    assert asyncio.run(in_loop())[-1].reward == 1.0
    env.close()
