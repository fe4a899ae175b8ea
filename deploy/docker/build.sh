#!/usr/bin/env bash
# Build nnserve images on this host's engine, on the base image engine.sh provides:
#
#   deploy/docker/build.sh cpu train lb      # what the deployment test needs
#   deploy/docker/build.sh gpu               # ~3 GB of CUDA wheels (CUDA_MAJOR=12 or 13)
#
# Tags nnserve:<target> (nnserve:lb for the load balancer), the names docker-compose.yml uses. Builds run with
# the host's network (engines started by engine.sh have no default bridge for build containers).
set -euo pipefail
cd "$(dirname "$0")/../.."
DOCKER=${DOCKER:-$(if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi)}
# BuildKit builds only the stages a target needs; the classic builder (DOCKER_BUILDKIT=0) builds the same images.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-1}
PYTHON_IMAGE=$(deploy/docker/engine.sh | sed -n 's/^PYTHON_IMAGE=//p')
for target in "$@"; do
    start=$(date +%s)
    args=(--network host --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --tag "nnserve:$target")
    if [ "$target" = lb ]; then
        "$DOCKER" build "${args[@]}" deploy/lb
    else
        "$DOCKER" build "${args[@]}" --build-arg "CUDA_MAJOR=${CUDA_MAJOR:-12}" \
            ${PIP_EXTRA_INDEX_URL:+--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL"} --target "$target" .
    fi
    echo "build.sh: nnserve:$target in $(($(date +%s) - start)) s," \
        "$("$DOCKER" image inspect --format '{{.Size}}' "nnserve:$target" | awk '{printf "%d MB", $1 / 1e6}')" >&2
done
