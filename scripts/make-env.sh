#!/usr/bin/env bash
# Writes .env next to docker-compose.yml: the compose stack's secrets, each a fresh
# random value. `docker compose` reads .env and refuses to start without it (every
# secret is ${NAME:?...} in docker-compose.yml). An existing .env is kept unless
# --force is given: its passwords are already in Kafka's and Grafana's volumes.
#
#   scripts/make-env.sh            write .env (mode 600) unless it exists
#   scripts/make-env.sh --force    replace it (then: docker compose down -v, to
#                                  drop the volumes that hold the old ones)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_FILE=${ENV_FILE:-.env}

if [[ -e $ENV_FILE && ${1:-} != --force ]]; then
    echo "$ENV_FILE exists; keeping it (scripts/make-env.sh --force replaces it)" >&2
    exit 0
fi

secret() {  # 32 random bytes, URL-safe base64 without padding (43 characters)
    head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

umask 077
cat > "$ENV_FILE.tmp" <<ENV
# Secrets of the living-efficacy compose stack, written by scripts/make-env.sh.
# Keep this file out of version control (.gitignore has it).

# Grafana's admin user (anonymous visitors are viewers).
GRAFANA_ADMIN_PASSWORD=$(secret)
# Kafka: the broker's own user (inter-broker SASL/PLAIN, admin tools).
KAFKA_ADMIN_PASSWORD=$(secret)
# Kafka: password of the broker's keystore and truststore (PKCS12).
KAFKA_SSL_PASSWORD=$(secret)
# Kafka: the SCRAM-SHA-512 user 'efficacy' of the worker and the simulator.
EFFICACY_SASL_PASSWORD=$(secret)
# Bearer token of the workers' score lookup (port 6066).
EFFICACY_LOOKUP_TOKEN=$(secret)
ENV
mv "$ENV_FILE.tmp" "$ENV_FILE"
echo "wrote $ENV_FILE (mode 600)" >&2
