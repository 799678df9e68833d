# The living-efficacy worker (and the simulator: same image, other command).
# Built by docker-compose.yml; `docker build -t living-efficacy .` works alone too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JAX_PLATFORMS=cpu \
    JAX_ENABLE_X64=1

WORKDIR /app

# Dependencies first, from pyproject.toml and the lock alone: this layer stays cached
# while only the sources change. The worker's dependencies (not the test or plots
# extras) at the lock's versions (requirements.lock as constraints). Then the
# project itself, without touching them.
COPY pyproject.toml README.md requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c requirements.lock -r /tmp/requirements.txt
COPY model ./model
COPY streams ./streams
COPY monitoring ./monitoring
COPY cli ./cli
RUN pip install --no-deps .

# The data directory (streams/data_dir.py: RocksDB stores, compilation cache, lock) is
# the only place the worker writes, owned by an unprivileged user; docker-compose.yml
# puts an anonymous volume there, one per replica, and the rest read-only.
RUN useradd --system --uid 10001 --home-dir /var/lib/efficacy --create-home efficacy
USER efficacy
ENV EFFICACY_DATA_DIR=/var/lib/efficacy

# 9108: Prometheus /metrics (EFFICACY_METRICS_PORT); 6066: faust's web server.
EXPOSE 9108 6066

CMD ["efficacy", "worker", "--loglevel", "info"]
