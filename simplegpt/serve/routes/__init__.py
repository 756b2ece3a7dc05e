"""The server's routes, one APIRouter per concern; each route takes the app's ServerState as a
parameter of type state.State:

- completions: POST /v1/completions;
- chat: POST /v1/chat/completions;
- tokenizer: GET /tokenizer_info, POST /tokenize, POST /detokenize (vLLM's shapes);
- status: GET /v1/models, /health, /metrics, /load;
- playground: GET /, the page in serve/static/.
"""

from . import chat, completions, playground, status, tokenizer

ROUTERS = [status.router, playground.router, tokenizer.router, completions.router, chat.router]
