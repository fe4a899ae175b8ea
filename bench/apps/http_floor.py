"""HTTP floor: FastAPI + uvicorn reading the request body and answering a constant.

No decode, no model: what the web stack alone costs per request, the ceiling any FastAPI-based server can reach.
It runs as many uvicorn processes as nnserve runs API servers (`NNSERVE_API_SERVERS`).
"""

import json

import uvicorn
from fastapi import FastAPI, Request, Response

from bench.apps import CONSTANT_REPLY, arguments

REPLY = json.dumps(CONSTANT_REPLY).encode()
app = FastAPI()


@app.post("/v1/{model}/predict")
async def predict(model: str, request: Request) -> Response:
    await request.body()
    return Response(REPLY, media_type="application/json")


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


if __name__ == "__main__":
    from service.config import Settings

    args = arguments(__doc__.splitlines()[0])
    uvicorn.run(
        "bench.apps.http_floor:app",
        host=args.host,
        port=args.port,
        workers=Settings().api_servers,
        log_level="warning",
        access_log=False,
    )
