"""HTTP floor: FastAPI + uvicorn reading the request body and answering a constant.

No decode, no model: what the web stack alone costs per request, the ceiling any FastAPI-based server can reach.
The benchmark runs it with as many uvicorn processes (`--workers`) as nnserve runs HTTP servers.
"""

import json

import uvicorn
from fastapi import FastAPI, Request, Response

from bench.apps import CONSTANT_REPLY, command_line

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
    parser = command_line(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    uvicorn.run(
        "bench.apps.http_floor:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
