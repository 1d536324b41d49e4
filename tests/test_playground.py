"""The playground page at / (issue 14) in a real headless chromium: it loads the server's budgets, sends a
chat request, and renders each generated token colored by its loops, with mean loops and KV bytes shown.

Playwright drives Debian's chromium (apt-get install chromium; .ci/run installs it): Playwright's own
browser download cannot reach its servers here."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from test_server import PROBLEMS, TEMPLATE, start_server  # noqa: E402


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory, "--kv", "last,per_loop", "--chat-template", TEMPLATE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium); CI installs it")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        yield page
        browser.close()
        assert not errors, errors


def test_playground_loads_the_budgets_on_offer(page):
    page.wait_for_function("document.querySelectorAll('#kv option').length === 2")
    assert page.locator("#model").inner_text().startswith("chain-r4")
    assert page.locator("#kv option").all_inner_texts() == ["last", "per_loop"]
    assert page.locator("#loops option").count() == 5  # default, 1..4
    assert page.locator("#exit").input_value() == "q:0.6"  # the model has an exit gate
    assert page.locator("#mode").input_value() == "chat"
    assert page.locator("#legend span").count() == 4


def test_playground_chat_renders_tokens_colored_by_loops(page):
    page.fill("#max_tokens", "12")
    page.fill("#prompt", PROBLEMS[0])
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('#log .tok').length >= 2 && !document.querySelector('#send').disabled",
                           timeout=60_000)
    toks = page.locator("#log .tok")
    loops = [int(x) for t in toks.all() for x in t.get_attribute("data-loops").split(",")]
    assert all(1 <= n <= 4 for n in loops)
    colors = {t.evaluate("e => getComputedStyle(e).backgroundColor") for t in toks.all()}
    assert "rgba(0, 0, 0, 0)" not in colors  # every token is colored
    assert len(colors) == len(set(max(int(x) for x in t.get_attribute("data-loops").split(",")) for t in toks.all()))
    assert toks.first.inner_text() == "5"  # the answer to the 3-hop problem
    assert int(page.locator("#n_tokens").inner_text()) == len(loops)
    assert float(page.locator("#mean_loops").inner_text()) == pytest.approx(sum(loops) / len(loops), abs=0.01)
    assert page.locator(".err").count() == 0
    shot = os.environ.get("LOOPLM_PLAYGROUND_SCREENSHOT")  # docs/figures/serving-playground.png is made so
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_playground_shows_kv_bytes_while_a_request_runs(page, server):
    """While requests run on per_loop, the page's KV counter (polled from /metrics every 500 ms) goes above 0, then
    back to 0. Besides the page's own request, 64 more (6,400 tokens at 4 loops, seconds of work) keep KV held
    across many polls, so the page sees it whatever the machine's speed (one request alone can end between two
    polls)."""
    import concurrent.futures

    import httpx

    body = dict(prompt="a=1;b=a;c=b;c", max_tokens=100, ignore_eos=True, kv="per_loop", num_loops=4)

    def one(_):
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).status_code

    pool = concurrent.futures.ThreadPoolExecutor(16)
    load = [pool.submit(one, i) for i in range(64)]
    page.select_option("#kv", "per_loop")
    page.select_option("#loops", "4")
    page.fill("#exit", "")
    page.fill("#max_tokens", "100")
    page.check("#ignore_eos")
    page.evaluate("""() => { window.kvSeen = 0; new MutationObserver(() => {
        window.kvSeen = Math.max(window.kvSeen, parseInt(document.querySelector('#kv_bytes').textContent.replace(/\\D/g, ''), 10) || 0);
    }).observe(document.querySelector('#kv_bytes'), { childList: true, characterData: true, subtree: true }); }""")
    page.fill("#prompt", PROBLEMS[1])
    page.click("#send")
    page.wait_for_function("window.kvSeen > 0", timeout=60_000)
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
    assert [f.result() for f in load] == [200] * 64
    pool.shutdown()
    page.wait_for_function("document.querySelector('#kv_bytes').textContent === '0'", timeout=10_000)
    assert page.evaluate("window.kvSeen") > 0
