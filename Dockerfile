# changerelay in a container: `docker build -t changerelay .`, or `docker compose up` (compose.yaml
# adds a MongoDB 8 single-node replica set). Settings come from the environment, as everywhere.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Pinned runtime dependencies first, so that code changes reuse this layer.
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md server.py ./
COPY changerelay ./changerelay
COPY templates ./templates
COPY static ./static
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Never as root: the relay needs no privilege (port 8000, no files written).
RUN useradd --system --uid 10001 --no-create-home changerelay
USER changerelay

# Inside a container the relay must listen on every interface. With HOST not loopback the relay
# does no Host check unless ALLOWED_HOSTS is set: set it to the names clients use (compose does).
ENV HOST=0.0.0.0 \
    PORT=8000 \
    LOG_FORMAT=json
EXPOSE 8000

# Ready means the change stream is open (/readyz answers 503 while MongoDB is unreachable).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]

CMD ["changerelay"]
