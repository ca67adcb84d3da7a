# apserve image: `docker compose up` (docker-compose.yml) or `docker build -t apserve .`
# Stage 1 compiles the native bit-serial kernels (setup.py) into a wheel; stage 2 keeps only the wheels.

FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY model_store ./model_store
COPY kernels ./kernels
COPY policies ./policies
COPY server ./server
COPY training ./training
COPY loadtest ./loadtest
# torch is only in the [train]/[dev] extras: the serving image never installs it.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APSERVE_HOST=0.0.0.0 \
    APSERVE_PORT=8000
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin apserve \
    && install -d -o 10001 -g 10001 /home/apserve/.cache/apserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/apserve-*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /home/apserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
ENTRYPOINT ["apserve"]
CMD ["serve"]
