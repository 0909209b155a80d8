# The tagstream image: worker, trainer (TensorFlow included via the `train` extra) and every other command.
# Used by docker-compose.yml; `docker run tagstream:latest <command>` runs `tagstream <command>`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install ".[train]" \
    && useradd --create-home --uid 1000 tagstream \
    && mkdir -p /models /data \
    && chown tagstream:tagstream /models

USER tagstream
ENTRYPOINT ["tagstream"]
CMD ["worker"]
