"""Tutorial baseline: a trained model served the way a first FastAPI tutorial serves it.

FastAPI + uvicorn, one process; each request decodes its image(s) with PIL and runs the PyTorch model from the
TorchScript artifact (`model.pt`) right in the async handler, one image at a time, with torch's default intra-op
threads unless `--threads` says otherwise. On a machine whose cores are also busy with other work (the load
generator included) those threads oversubscribe the cores, which is why this is not the peer the headline
ratios use (`peer_ort.py` is). Preprocessing is the manifest's; routes and bodies are nnserve's (raw image,
multipart, series JSON).
"""

from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import UploadFile  # what form parts are; fastapi's UploadFile subclasses it

import models
from bench.apps import command_line, top_k
from bench.payloads import image_tensor, series_tensor


def build(names: list[str], root: Path, device: torch.device) -> FastAPI:
    loaded = {}
    for name in names:
        version = models.load(root, name)
        net = torch.jit.load(str(version.artifact_path("torchscript")), map_location=device).eval()
        loaded[name] = (version.manifest, net)
    app = FastAPI()

    @app.post("/v1/{name}/predict")
    async def predict(name: str, request: Request) -> dict[str, object]:
        if name not in loaded:
            raise HTTPException(404, f"no model {name}")
        manifest, net = loaded[name]
        reply: dict[str, object] = {"model": manifest.name, "version": manifest.version}
        if manifest.series is not None:
            body = await request.json()
            x = torch.from_numpy(series_tensor(body["series"], manifest))[None].to(device)
            with torch.no_grad():
                forecast = net(x)[0, : body.get("horizon") or manifest.series.horizon]
            reply["predictions"] = [{"forecast": forecast.cpu().tolist()}]
            return reply
        assert manifest.preprocessing is not None and manifest.labels is not None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            images = [await part.read() for _, part in form.multi_items() if isinstance(part, UploadFile)]
        else:
            images = [await request.body()]
        predictions = []
        for png in images:
            x = torch.from_numpy(image_tensor(png, manifest.preprocessing))[None].to(device)
            with torch.no_grad():
                probs = torch.softmax(net(x), dim=1)
            predictions += top_k(probs.cpu().numpy(), manifest.labels)
        reply["predictions"] = predictions
        return reply

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    parser = command_line(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.models_dir) if args.models_dir else models.DEFAULT_ROOT
    app = build(args.model.split(","), root, torch.device(args.device))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
