"""HTTP floor: FastAPI + uvicorn reading the request body and answering a constant.

No decode, no model: what the web stack alone costs per request, the ceiling any FastAPI-based server can reach.
The benchmark runs it as `python -m uvicorn bench.apps.http_floor:create_app --factory --workers N` with as many
processes as nnserve runs HTTP servers.
"""

import json

from fastapi import FastAPI, Request, Response

from bench.apps import CONSTANT_REPLY

REPLY = json.dumps(CONSTANT_REPLY).encode()


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        await request.body()
        return Response(REPLY, media_type="application/json")

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app
