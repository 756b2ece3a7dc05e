"""The playground: GET / is the one page in static/ (a prompt box that streams from /v1/completions)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
