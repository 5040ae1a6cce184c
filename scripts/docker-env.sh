#!/usr/bin/env bash
# scripts/docker-env.sh: docker/.env for docker/compose.yaml, from docker/.env.example (README: Run on a cluster).
#
#   - fresh secrets (POSTGRES_PASSWORD, RAY_AUTH_TOKEN), the file chmod 600;
#   - POSTGRES_IMAGE and BASE_IMAGE: the official pinned images where present or pullable, else the local
#     stand-ins `make test-cluster` builds (local/postgres:15-bookworm, local/debian:bookworm) where those exist;
#   - ./data and ./results (the containers' mounts) made, owned by uid 1000, the containers' user (as root: chowned;
#     otherwise the command to run is printed).
# An existing docker/.env is kept (its secrets are in use) unless --force. Run it from anywhere in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_FILE=docker/.env
EXAMPLE=docker/.env.example
say() { echo "docker-env: $*"; }

if [[ -e $ENV_FILE && ${1:-} != --force ]]; then
  say "$ENV_FILE exists and is kept (its secrets are in use); scripts/docker-env.sh --force writes a new one" >&2
  exit 1
fi
command -v docker >/dev/null || { say "docker is not installed (sudo make test-cluster installs Debian's engine)" >&2; exit 1; }

secret() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
present() { docker image inspect "$1" >/dev/null 2>&1; }
# The official image where it is here or can be pulled (30 s at most), else the local stand-in where it exists.
pick() {
  local official=$1 stand_in=$2
  if present "$official" || timeout 30 docker pull -q "$official" >/dev/null 2>&1; then
    echo "$official"
  elif present "$stand_in"; then
    say "$official is not here and cannot be pulled: using the local stand-in $stand_in" >&2
    echo "$stand_in"
  else
    say "neither $official (cannot be pulled) nor $stand_in is here: sudo make test-cluster builds the stand-in" >&2
    echo "$official"
  fi
}

postgres=$(pick "$(sed -n 's/^POSTGRES_IMAGE=//p' "$EXAMPLE")" local/postgres:15-bookworm)
base=$(pick "$(sed -n 's/^BASE_IMAGE=//p' "$EXAMPLE")" local/debian:bookworm)
umask 077
sed -e "s/^POSTGRES_PASSWORD=$/POSTGRES_PASSWORD=$(secret 24)/" \
    -e "s/^RAY_AUTH_TOKEN=$/RAY_AUTH_TOKEN=$(secret 32)/" \
    -e "s#^POSTGRES_IMAGE=.*#POSTGRES_IMAGE=$postgres#" \
    -e "s#^BASE_IMAGE=.*#BASE_IMAGE=$base#" "$EXAMPLE" >"$ENV_FILE.tmp"
chmod 600 "$ENV_FILE.tmp" && mv "$ENV_FILE.tmp" "$ENV_FILE"
say "wrote $ENV_FILE (chmod 600): fresh POSTGRES_PASSWORD and RAY_AUTH_TOKEN, POSTGRES_IMAGE=$postgres, BASE_IMAGE=$base"

umask 022
mkdir -p data results
if [[ $(stat -c %u data) != 1000 || $(stat -c %u results) != 1000 ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    chown 1000:1000 data results
    say "data/ and results/ now belong to uid 1000, the containers' user"
  else
    say "data/ and results/ must belong to uid 1000, the containers' user: sudo chown 1000:1000 data results" >&2
  fi
fi
