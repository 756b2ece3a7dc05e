"""The playground's chat mode in a real headless Chromium against a real `simplegpt serve` over a
model with a chat template: each turn goes to /v1/chat/completions with the whole conversation, the
reply streams into the page, and New chat starts over."""

import httpx
import pytest

from test_chat_cli import chat_checkpoint
from test_playground import browser  # noqa: F401 (the fixture)
from test_server import start

pytest.importorskip("fastapi")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = start(chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny"))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def api_reply(server: str, messages: list[dict]) -> str:
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def say(page, text: str) -> None:
    page.evaluate("delete document.body.dataset.finish")
    page.fill("#message", text)
    page.press("#message", "Enter")
    page.wait_for_function("document.body.dataset.finish !== undefined", timeout=60_000)
    assert page.evaluate("document.body.dataset.finish") in ("stop", "length"), page.inner_text("#status")


@pytest.mark.parametrize("stream", [True, False])
def test_chat_mode_sends_the_conversation_and_shows_the_replies(server, browser, stream):  # noqa: F811
    sent = []
    page = browser.new_page()
    try:
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
        page.goto(f"{server}/?mode=chat&max_tokens={MAX_TOKENS}&temperature=0&stream={int(stream)}")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        assert page.is_visible("#message") and not page.is_visible("#prompt")
        page.fill("#system", "Be kind.")
        say(page, "hello there")
        say(page, "and again")
        system = {"role": "system", "content": "Be kind."}
        first = api_reply(server, [system, {"role": "user", "content": "hello there"}])
        turns = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                 {"role": "user", "content": "and again"}]
        second = api_reply(server, [system, *turns])
        assert [b["messages"] for b in sent] == [[system, turns[0]], [system, *turns]]
        assert all(b["stream"] is stream for b in sent)
        bubbles = page.eval_on_selector_all("#messages .msg", "els => els.map(e => [e.className, e.textContent])")
        assert bubbles == [["msg user", "hello there"], ["msg assistant", first], ["msg user", "and again"],
                           ["msg assistant", second]]
        page.click("#reset")
        assert page.eval_on_selector_all("#messages .msg", "els => els.length") == 0
        say(page, "hello there")
        assert sent[-1]["messages"] == [system, turns[0]]  # New chat: the earlier turns are gone
    finally:
        page.close()
