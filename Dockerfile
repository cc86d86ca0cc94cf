# execq image: the CLI, the worker and the producer library, installed from uv.lock.

# The sandbox's launcher (workers/sandbox/launch.c), built apart so the image has no compiler;
# linked statically, so each command's exec runs no dynamic loader (see docs/benchmarks.md).
FROM python:3.11-slim-bookworm AS launcher
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY workers/sandbox/launch.c /src/launch.c
RUN gcc -O2 -Wall -Wextra -Werror -static -o /execq-launch /src/launch.c

FROM python:3.11-slim-bookworm

# The sandbox's wrappers: util-linux has prlimit (limits), setpriv (uid switch, parent-death
# signal) and unshare (no network); bubblewrap builds a tenant's filesystem view.
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux procps bubblewrap \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir uv
COPY pyproject.toml uv.lock README.md ./
COPY config ./config
COPY producer ./producer
COPY workers ./workers
COPY --from=launcher /execq-launch /usr/local/libexec/execq-launch
RUN uv sync --frozen --no-dev --compile-bytecode \
 && mkdir -p /var/lib/execq/work /var/lib/execq/audit
ENV PATH="/app/.venv/bin:${PATH}" \
    EXECQ_WORKDIR_ROOT=/var/lib/execq/work \
    EXECQ_AUDIT_LOG=/var/lib/execq/audit/audit.jsonl

# No USER: a worker must start as root to switch commands to their tenant's uids and build
# namespaces; docker-compose.yml drops every capability and adds back only those it needs.
ENTRYPOINT ["execq"]
CMD ["--help"]
