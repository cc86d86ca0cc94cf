# execq image: the CLI, the worker and the producer library, installed from uv.lock.
FROM python:3.11-slim-bookworm

# util-linux provides prlimit and setpriv, the sandbox's limit and parent-death wrappers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir uv
COPY pyproject.toml uv.lock README.md ./
COPY config ./config
COPY producer ./producer
COPY workers ./workers
RUN uv sync --frozen --no-dev --compile-bytecode \
 && mkdir -p /var/lib/execq/work
ENV PATH="/app/.venv/bin:${PATH}" \
    EXECQ_WORKDIR_ROOT=/var/lib/execq/work

ENTRYPOINT ["execq"]
CMD ["--help"]
