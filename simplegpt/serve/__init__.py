"""An OpenAI-compatible HTTP API over the generation engine, and a web playground (`simplegpt serve`).

Endpoints (the shapes of OpenAI's API, so its official clients work against it):

- GET  /v1/models            the one model served
- POST /v1/completions       text completion: prompt (a string or a list of them), n, stream (SSE)
- POST /v1/chat/completions  chat over the base model through a plain-text template (chat_prompt)
- GET  /health               {"status": "ok"}
- GET  /                     the playground: a page that streams completions from /v1/completions

Sampling: temperature, top_p, seed, stop, max_tokens (max_completion_tokens for chat), n, and
simplegpt's own top_k, min_p, repetition_penalty and ignore_eos (the `extra_body` of OpenAI's
clients); logprobs (and chat's top_logprobs) in responses that are not streamed, with echo also
for the prompt's tokens (max_tokens 0 scores a prompt without generating). Options simplegpt has
no equivalent for (presence/frequency penalties, logit_bias, best_of, suffix, tools) are refused
with a 400, not silently dropped. Errors come as OpenAI's {"error": {"message", "type", "param",
"code"}} with 400 (bad request) or 404 (unknown model).

The modules, each with one job:
- app: create_app and the routes, thin steps from a request body to the engine and back;
- schemas: the request bodies (pydantic); params: their fields checked and made SamplingParams;
- chat: the chat template; responses: usage, server-sent events, logprobs, the model card;
- scheduler: runs generations one at a time and hands streamed pieces to the event loop;
- errors: APIError and OpenAI's error format.
The playground is simplegpt/static/index.html.
"""

from .app import Limits, create_app
from .chat import CHAT_STOP, chat_prompt
from .schemas import ChatMessage, ChatRequest, CompletionRequest

__all__ = ["create_app", "Limits", "CHAT_STOP", "chat_prompt", "ChatMessage", "ChatRequest", "CompletionRequest"]
