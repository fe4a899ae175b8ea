"""LitServe floor: a bare LitServe app with nnserve's server settings whose model returns a constant.

It reads the same `NNSERVE_*` settings as nnserve (batch size and timeout, workers, API servers, request
timeout) and serves one constant model per name on nnserve's routes, so the only difference left is nnserve's
own work: decoding, preprocessing, the model, and its response.

LitServe 0.2.19 parses every request body that is not a form as JSON, so this floor is sent images in the JSON
form nnserve also documents, `{"instances": [{"b64": "..."}]}`, and never decodes them. JSON with base64 is
the cheapest body LitServe can take (a multipart form costs more to parse), which keeps the floor a floor.
"""

import litserve as ls

from bench.apps import CONSTANT_REPLY, command_line


class ConstantAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, x: object) -> object:
        return [CONSTANT_REPLY] * len(x) if self.max_batch_size > 1 else CONSTANT_REPLY  # type: ignore[arg-type]


if __name__ == "__main__":
    from service.config import Settings
    from service.runtime import available_cpus

    args = command_line(__doc__.splitlines()[0]).parse_args()
    settings = Settings().for_host("cpu", available_cpus())  # the process counts nnserve would run here
    apis = [
        ConstantAPI(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path=f"/v1/{name}/predict",
        )
        for name in args.model.split(",")
    ]
    server = ls.LitServer(
        apis, accelerator="cpu", workers_per_device=settings.workers_per_device, timeout=settings.request_timeout
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=settings.api_servers,
        log_level="warning",
        generate_client_file=False,
        access_log=False,
    )
