"""The playground page in a real headless Chromium against a real `simplegpt serve` process: each
generated token is a span coloured by its probability, with the top alternatives on hover, all from
the API's logprobs; with the box off the page asks for none."""

import math
import os
from urllib.parse import quote

import httpx
import pytest

# the server (a tiny byte-level model on 127.0.0.1) and the browser helpers of the server's tests
from test_server import _browser, _has_playwright, checkpoint, server  # noqa: F401

MAX_TOKENS = 40
# Prompts whose greedy continuation, on that model, may split a character over several byte tokens
CANDIDATES = ["ROMEO:", "Hello", "JULIET:", "naïve "]


def completion(server: str, prompt: str, **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def split_prompt(server):  # noqa: F811
    """A prompt, and the API's greedy answer to it, in which one character is split over tokens
    (tokens sharing a text_offset): the case where token strings do not add up to the text."""
    for prompt in CANDIDATES:
        choice = completion(server, prompt, logprobs=5)
        offsets = choice["logprobs"]["text_offset"]
        if len(set(offsets)) < len(offsets):
            return prompt, choice
    raise AssertionError(f"no greedy continuation of {CANDIDATES} splits a character; add a prompt that does")


@pytest.fixture(scope="module")
def browser():
    path = _browser()
    if path is None or not _has_playwright():
        if os.environ.get("CI"):
            raise RuntimeError("CI needs Chromium and playwright for the playground test (see .ci/run)")
        pytest.skip("no Chromium or playwright here: apt-get install chromium; pip install playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


def generate(page, finish: str = "length") -> None:
    page.evaluate("delete document.body.dataset.finish")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.finish !== undefined", timeout=60_000)
    assert page.evaluate("document.body.dataset.finish") == finish, page.inner_text("#status")


def token_spans(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#output .completion .tok",
        "els => els.map(e => ({text: e.textContent, p: Number(e.dataset.p), token: e.dataset.token,"
        " background: getComputedStyle(e).backgroundColor}))")


@pytest.mark.parametrize("stream", [True, False])
def test_tokens_coloured_by_probability_with_alternatives_and_none_asked_when_off(
        server, split_prompt, browser, stream, tmp_path):  # noqa: F811
    prompt, want = split_prompt
    lp = want["logprobs"]
    sent = []
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    try:
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/completions") else None)
        page.goto(f"{server}/?max_tokens={MAX_TOKENS}&temperature=0&stream={int(stream)}&prompt={quote(prompt)}")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        assert page.is_checked("#colour") and page.is_visible("#legend")
        generate(page)
        assert sent[-1]["logprobs"] == 5 and sent[-1]["stream"] is stream

        spans = token_spans(page)
        assert "".join(s["text"] for s in spans) == want["text"]
        assert page.evaluate("document.querySelector('#output .completion').textContent") == want["text"]
        assert [s["token"] for s in spans] == lp["tokens"]
        for s, logprob in zip(spans, lp["token_logprobs"]):
            assert s["p"] == pytest.approx(math.exp(logprob), abs=1e-4)
        # a character split over tokens is whole in its first token's span; the others are empty marks
        offsets = lp["text_offset"]
        split = [i for i in range(1, len(offsets)) if offsets[i] == offsets[i - 1]]
        first = split[0] - 1
        char = want["text"][offsets[first]:next(o for o in offsets[first:] + [len(want["text"])] if o > offsets[first])]
        assert len(char.encode()) > 1 and spans[first]["text"] == char and spans[split[0]]["text"] == ""
        # the scale: likelier tokens get another colour
        lo, hi = min(spans, key=lambda s: s["p"]), max(spans, key=lambda s: s["p"])
        assert lo["background"] != hi["background"]

        # hovering a token lists the alternatives, the chosen one (greedy: the top one) marked
        for i in (2, split[0]):
            page.hover(f"#output .completion .tok >> nth={i}")
            page.wait_for_selector("#tokinfo:not([hidden])")
            rows = page.eval_on_selector_all(
                "#tokinfo tr.alt",
                "els => els.map(e => ({token: e.dataset.token, chosen: e.classList.contains('chosen'),"
                " cells: [...e.cells].map(c => c.textContent)}))")
            top = sorted(lp["top_logprobs"][i].items(), key=lambda kv: -kv[1])
            assert [r["token"] for r in rows] == [t for t, _ in top]
            assert rows[0]["chosen"] and rows[0]["token"] == lp["tokens"][i] and "chosen" in rows[0]["cells"][2]
            assert not any(r["chosen"] for r in rows[1:])
            assert rows[0]["cells"][1] == f"{100 * math.exp(lp['token_logprobs'][i]):.1f}%"
            page.mouse.move(1, 1)
            page.wait_for_selector("#tokinfo", state="hidden")
        page.hover(f"#output .completion .tok >> nth={first}")
        page.screenshot(path=tmp_path / "playground.png")
        assert (tmp_path / "playground.png").stat().st_size > 0

        # a stop string: the text held back while it may start one still lands in the right spans,
        # and the stop string's own tokens are empty marks at the end
        stop = next(want["text"][k:k + 2] for k in range(len(want["text"]) // 3, len(want["text"]) - 2)
                    if want["text"][k:k + 2].isascii() and want["text"][k:k + 2].isprintable())
        stopped = completion(server, prompt, logprobs=5, stop=[stop])
        assert stopped["finish_reason"] == "stop"
        page.fill("#stop_text", stop)
        generate(page, "stop")
        spans = token_spans(page)
        assert "".join(s["text"] for s in spans) == stopped["text"]
        assert [s["token"] for s in spans] == stopped["logprobs"]["tokens"]
        page.fill("#stop_text", "")

        # the box off: no logprobs asked, the same text, plain
        page.uncheck("#colour")
        assert not page.is_visible("#legend")
        generate(page)
        assert "logprobs" not in sent[-1] and sent[-1]["stream"] is stream
        assert page.evaluate("document.querySelector('#output .completion').textContent") == want["text"]
        assert page.eval_on_selector_all("#output .completion .tok", "els => els.length") == 0
    finally:
        page.close()
