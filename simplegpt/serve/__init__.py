"""An OpenAI-compatible HTTP API over the generation engine, and a web playground (`simplegpt serve`).

Endpoints (the shapes of OpenAI's API, so its official clients work against it):

- GET  /v1/models            the one model served
- POST /v1/completions       text completion: prompt (a string or a list of them), n, stream (SSE)
- POST /v1/chat/completions  chat through the checkpoint's chat template, or for a base model a plain-text one (chat_prompt)
- GET  /tokenizer_info, POST /tokenize, POST /detokenize
                             the tokenizer in vLLM's shapes (lm-evaluation-harness's API client uses them)
- GET  /health               {"status": "ok"}, always open
- GET  /metrics              Prometheus metrics (needs the key when the server has one)
- GET  /load                 sequences decoding and waiting (the playground shows it)
- GET  /                     the playground: a page that streams completions from /v1/completions

Sampling: temperature, top_p, seed, stop, max_tokens (max_completion_tokens for chat), n, and
simplegpt's own top_k, min_p, repetition_penalty and ignore_eos (the `extra_body` of OpenAI's
clients); logprobs (and chat's top_logprobs), streamed or not, with echo also for the prompt's
tokens (max_tokens 0 scores a prompt without generating). Options simplegpt has
no equivalent for (presence/frequency penalties, logit_bias, best_of, suffix, tools) are refused
with a 400, not silently dropped. Errors come as OpenAI's {"error": {"message", "type", "param",
"code"}}: 400, 401 (key), 404, 408, 413 (body), 429 (queue full, with Retry-After), 500 (this request's
decoding failed; the others go on), 504 (timeout).
Requests are batched continuously (simplegpt.generation.scheduler.ContinuousBatcher).

The modules, each with one job:
- app: create_app, a few lines that put the parts below together;
- state: Limits and ServerState, the one object the routes share (a FastAPI dependency);
- routes/: one APIRouter per concern (completions, chat, tokenizer, status, playground);
- running: a submitted request awaited, scored or streamed as server-sent events;
- schemas: the request bodies (pydantic); params: their fields checked and made SamplingParams;
- chat: the chat template; responses: usage, server-sent events, logprobs, the model card;
- scheduler: submits requests to the batcher and hands their pieces and results to the event loop;
- guard: the Host check, API keys, body limits and the access log; metrics: Prometheus metrics;
- errors: APIError and OpenAI's error format.
The playground is simplegpt/serve/static/index.html.
"""

from .app import create_app
from .chat import CHAT_STOP, chat_prompt
from .schemas import ChatMessage, ChatRequest, CompletionRequest
from .state import Limits

__all__ = ["create_app", "Limits", "CHAT_STOP", "chat_prompt", "ChatMessage", "ChatRequest", "CompletionRequest"]
