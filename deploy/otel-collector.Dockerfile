# The OpenTelemetry Collector image is FROM scratch: no shell, no wget, nothing a Docker
# healthcheck could run. This adds one statically linked busybox (Debian's busybox-static)
# for `busybox wget` against the health_check extension, and nothing else.
FROM debian:bookworm-slim AS probe
RUN apt-get update \
 && apt-get install -y --no-install-recommends busybox-static \
 && rm -rf /var/lib/apt/lists/*

FROM otel/opentelemetry-collector-contrib:0.115.0
COPY --from=probe /bin/busybox /healthcheck/busybox
