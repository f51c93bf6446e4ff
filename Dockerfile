# Tollway gateway: slim, non-root, with a health check on /healthz.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 tollway
COPY --from=build /install /usr/local
WORKDIR /app
COPY policies.yaml ./policies.yaml
RUN mkdir -p /app/data && chown tollway:tollway /app/data
# state.dir and the usage database: mount a volume here; mount your policy over /app/policies.yaml
VOLUME ["/app/data"]
USER tollway
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
CMD ["tollway", "serve", "--policy", "/app/policies.yaml", "--host", "0.0.0.0", "--port", "8080"]
