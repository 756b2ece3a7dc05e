"""The server's /v1/chat/completions over a checkpoint with a chat template: a real `simplegpt serve`
on 127.0.0.1 and OpenAI's client. The prompt is the template's, and a reply stops at <|im_end|>."""

import pytest

from simplegpt import load_checkpoint
from simplegpt.chat import chat_format

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_chat_cli import chat_checkpoint  # noqa: E402
from test_server import start  # noqa: E402

MESSAGES = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "add 3 and 4"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server over a model whose every greedy token is <|im_end|>, and its checkpoint."""
    checkpoint = chat_checkpoint(tmp_path_factory.mktemp("chat") / "ends", ends_at_once=True)
    proc, port = start(checkpoint)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), checkpoint
    proc.terminate()
    proc.wait(timeout=30)


def test_chat_completions_use_the_checkpoints_template_and_stop_at_the_marker(served):
    client, checkpoint = served
    fmt = chat_format(load_checkpoint(checkpoint).tokenizer)
    # a developer message is the template's system one
    want = fmt.prompt_ids([{"role": "system", "content": "Be kind."}, MESSAGES[1]])
    out = client.chat.completions.create(model="ends", messages=MESSAGES, max_tokens=10, temperature=0)
    # with the plain template the reply would be '<|im_end|>' text up to max_tokens
    assert out.choices[0].message.content == "" and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(want) and out.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(model="ends", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_messages_longer_than_the_context_are_a_400_naming_messages(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ends", messages=[{"role": "user", "content": "x" * 300}], max_tokens=4)
    error = e.value.body
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded", error
    assert error["message"].startswith("the messages have ") and "prompt has" not in error["message"], error
