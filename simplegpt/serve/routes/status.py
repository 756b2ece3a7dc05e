"""What the server serves and how it is doing: /v1/models, /health, /metrics (Prometheus) and
/load (the playground's view of the batch)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from ..responses import model_card
from ..state import State

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/load", include_in_schema=False)
def load(state: State) -> dict[str, int]:
    """The playground's view of the server's load."""
    scheduler = state.scheduler
    return {"running": scheduler.running, "queued": scheduler.queued, "max_batch": state.limits.max_batch}


@router.get("/v1/models")
def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state.engine, state.model_name, state.created)]}


@router.get("/v1/models/{name:path}")  # ids such as org/tiny-gpt hold a slash
def model(name: str, state: State) -> dict[str, Any]:
    state.check_model(name)
    return model_card(state.engine, state.model_name, state.created)
