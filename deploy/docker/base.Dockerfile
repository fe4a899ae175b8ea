# A stand-in for python:3.11-slim-bookworm, for hosts that cannot reach an image registry (see engine.sh):
# Debian bookworm (debootstrap, imported as DEBIAN_IMAGE) with its Python 3.11 as `python`, like the official
# image. The host's CA bundle comes along so that pip and apt trust the same TLS endpoints the host trusts.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN ln -s /usr/bin/python3 /usr/local/bin/python \
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
CMD ["python3"]
