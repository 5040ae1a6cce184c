#!/usr/bin/env bash
# make test-cluster: a real multi-node cluster on this machine, from docker/compose.yaml, checked from the host.
# make test-cluster-hosts (`scripts/test-cluster.sh hosts`): a head host and two worker hosts that share only
# published ports and an S3 server (tests/cluster/hosts.py).
#
# As root on Debian: uses the running Docker engine, or installs Debian's (docker.io) and starts containerd and
# dockerd by hand, stopping on exit only what it started. Adds the buildx and compose v2 CLI plugins when the
# engine has none (Debian trixie's .debs, fetched through a private apt directory, unpacked into a cache: the
# system's apt sources stay as they are). Builds the base image `local/debian:bookworm` with debootstrap when
# absent (no registry is needed). Then tests/cluster/scenario.py builds the images, runs the cluster and its
# checks, tears it down (also on failure) and writes results/cluster/<date>.md.
#
# Settings: BASE_IMAGE (default local/debian:bookworm; any image you can pull works, e.g. debian:12.11-slim),
# BVIT_CLUSTER_CACHE (default /var/cache/bvit-sweep-cluster: CLI plugins, logs).
set -euo pipefail
cd "$(dirname "$0")/.."

export BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
CACHE=${BVIT_CLUSTER_CACHE:-/var/cache/bvit-sweep-cluster}
PROJECT=bvit-cluster-test
PHASES=()
started_pids=()

say() { echo "test-cluster: $*"; }
die() { echo "test-cluster: $*" >&2; exit 1; }
now() { echo "$EPOCHREALTIME"; }
record() { PHASES+=("$1|$(awk -v a="$2" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')|$3"); }  # name, start, command

[[ $(id -u) -eq 0 ]] || die "run as root: it may install and start a Docker engine (sudo make test-cluster)"
command -v apt-get >/dev/null || die "needs a Debian-like system with apt-get (or a running Docker engine with buildx and compose v2)"
mkdir -p "$CACHE"

stop_started() {
  local rc=$?
  if docker info >/dev/null 2>&1; then  # a second safety net: the scenario tears down in its own `finally`
    POSTGRES_PASSWORD=x RAY_AUTH_TOKEN=x docker compose -p "$PROJECT" -f docker/compose.yaml down -v -t 1 \
      >/dev/null 2>&1 || true
    POSTGRES_PASSWORD=x RAY_AUTH_TOKEN=x RAY_HEAD_IP=x docker compose -p bvit-hosts-head -f docker/compose.yaml \
      -f docker/compose.head.yaml down -v -t 1 >/dev/null 2>&1 || true
    for w in a b; do RAY_HEAD_IP=x RAY_NODE_IP=x RAY_AUTH_TOKEN=x docker compose -p "bvit-hosts-worker-$w" \
      -f docker/compose.worker.yaml down -v -t 1 >/dev/null 2>&1 || true; done
  fi
  for ((i = ${#started_pids[@]} - 1; i >= 0; i--)); do
    local pid=${started_pids[i]}
    say "stopping $(ps -o comm= -p "$pid" 2>/dev/null || echo process) (pid $pid), which this run started"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { say "pid $pid did not stop within 30 s; killing it"; kill -9 "$pid" || true; }
  done
  exit "$rc"
}
trap stop_started EXIT
trap 'exit 130' INT TERM

# --- the engine -------------------------------------------------------------------------------------------------
t0=$(now)
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null || ! command -v containerd >/dev/null; then
    say "no Docker engine here: installing Debian's docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then  # installing it may have started it (systemd)
    if [[ ! -S /run/containerd/containerd.sock ]]; then
      containerd >"$CACHE/containerd.log" 2>&1 &
      started_pids+=($!)
      for _ in $(seq 1 30); do [[ -S /run/containerd/containerd.sock ]] && break; sleep 0.5; done
    fi
    dockerd --containerd=/run/containerd/containerd.sock >"$CACHE/dockerd.log" 2>&1 &
    started_pids+=($!)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || die "dockerd did not come up; see $CACHE/dockerd.log"
    say "started containerd and dockerd (pids ${started_pids[*]}); they are stopped at the end"
  fi
  record "Docker engine: install and start" "$t0" "apt-get install docker.io, then containerd & dockerd &"
else
  say "using the running Docker engine ($(docker version -f '{{.Server.Version}}'))"
fi

# --- buildx and compose v2 --------------------------------------------------------------------------------------
if ! docker buildx version >/dev/null 2>&1 || ! docker compose version 2>/dev/null | grep -q 'version v\?2'; then
  export DOCKER_CONFIG=$CACHE/docker-config
  plugins=$DOCKER_CONFIG/cli-plugins
  if [[ ! -x $plugins/docker-buildx || ! -x $plugins/docker-compose ]]; then
    t0=$(now)
    say "fetching the buildx and compose v2 plugins (Debian trixie's docker-buildx and docker-compose .debs)"
    apt_dir=$CACHE/trixie-apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$plugins"
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} trixie main" \
      >"$apt_dir/sources.list"
    opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_dir/lists"
          -o "Dir::Cache=$apt_dir/cache" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$apt_dir/debs" && apt-get "${opts[@]}" download docker-buildx docker-compose >/dev/null)
    rm -rf "$apt_dir/x" && for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$apt_dir/x"; done
    cp "$apt_dir"/x/usr/libexec/docker/cli-plugins/docker-{buildx,compose} "$plugins/"
    record "CLI plugins: buildx + compose v2" "$t0" "apt-get download docker-buildx docker-compose (trixie)"
  fi
fi
docker buildx version >/dev/null && docker compose version | grep -q 'version v\?2' \
  || die "docker buildx and docker compose v2 are needed and could not be set up"

# --- the base image ---------------------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [[ $BASE_IMAGE == local/debian:bookworm ]] || die "BASE_IMAGE $BASE_IMAGE is not present; docker pull it first"
  t0=$(now)
  command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /var/tmp/bvit-rootfs.XXXXXX)
  say "building $BASE_IMAGE: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $CACHE/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs/etc/apt/sources.list"
  security=${mirror%/debian}/debian-security
  printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: %s\n' \
    "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg "$security" /usr/share/keyrings/debian-archive-keyring.gpg \
    >"$rootfs/etc/apt/sources.list.d/debian.sources"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  record "base image (debootstrap + docker import)" "$t0" "debootstrap --variant=minbase bookworm ROOTFS $mirror, then tar -C ROOTFS -c . | docker import - $BASE_IMAGE"
fi

# --- the cluster and its checks ---------------------------------------------------------------------------------
export BVIT_ENGINE_PHASES
BVIT_ENGINE_PHASES=$(printf '%s\n' "${PHASES[@]}")
rc=0
case ${1:-one-host} in
  one-host) .venv/bin/python tests/cluster/scenario.py || rc=$? ;;
  hosts) .venv/bin/python tests/cluster/hosts.py || rc=$? ;;  # make test-cluster-hosts
  *) die "unknown scenario ${1}: one-host (make test-cluster) or hosts (make test-cluster-hosts)" ;;
esac
exit "$rc"
