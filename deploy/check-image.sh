#!/usr/bin/env bash
# Container check (called by .ci/run; runs alone too): build the image and run it the ways the
# README says, with podman.
#
#   deploy/check-image.sh            # as root on a Debian host; installs podman, runc, mmdebstrap
#
# 1. a local base image: mmdebstrap -> `podman import`, a venv first on PATH with the Makefile's
#    torch pins (no image registry is needed: Docker Hub may be unreachable)
# 2. the Dockerfile built on it (`--build-arg BASE_IMAGE=`), run, /readyz, the README's ant photo
#    classified and compared with the README's answer
# 3. docker-compose.yml through podman-compose with deploy/compose.cpu.yml (no GPU here): the app,
#    the trainer service's --help, a one-epoch training on a tiny 3-class ImageFolder, and that
#    task served by the running app from the shared store volume
#
# It skips (exit 0, one line) only where containers cannot run at all: no podman and no way to
# install it, or a podman engine that cannot start. Any other failure fails the check.
# Scratch (rootfs, podman-compose venv, photos): $RLRR_CHECK_DIR (default /var/tmp/rlrr-check).
# Base images stay in container storage, so a second run only rebuilds the project's layers.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
W=${RLRR_CHECK_DIR:-/var/tmp/rlrr-check}
# The shared data beside the clone (README: ../shared/data), or one level further up (a worktree)
SHARED=${RLRR_SHARED_DATA:-}
for d in "$REPO/../shared/data" "$REPO/../../shared/data"; do [ -n "$SHARED" ] || { [ -d "$d" ] && SHARED=$(cd "$d" && pwd); }; done
PODMAN_COMPOSE_VERSION=1.6.0
IMAGE=rlrr-serve:latest          # the name docker-compose.yml runs
PROJECT=rlrr-check               # compose project: its own containers and volumes
T0=$(date +%s)
mkdir -p "$W"

# podman without systemd cannot schedule healthchecks (it says so at every start; `podman
# healthcheck run` below checks the HEALTHCHECK instead); the pip of this host has local wheel folders.
quiet() { grep -v -e 'unable to get systemd connection' -e '^WARNING: Location' -e 'input device is not a TTY' || true; }
say() { printf '[check-image %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
skip() { echo "container check SKIPPED: $*"; exit 0; }
die() { echo "container check FAILED: $*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------------------------
install_tools() {
    local missing=()
    for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            command -v podman >/dev/null || skip "no podman, and no root apt-get to install it"
            die "missing ${missing[*]} (install them: apt-get install ${missing[*]})"
        fi
        say "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
    fi
    if [ ! -x "$W/pc/bin/podman-compose" ]; then
        say "podman-compose $PODMAN_COMPOSE_VERSION into $W/pc"
        python3 -m venv "$W/pc"
        "$W/pc/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" 2> >(quiet >&2)
    fi
}

# runc (crun refuses hybrid cgroups); default ulimits within the host's hard limits (podman's
# default of 1048576 fails without CAP_SYS_RESOURCE; nproc above 32768 fails under conmon here).
configure_podman() {
    local nofile nproc
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    cat > "$W/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$W/containers.conf
    podman info >/dev/null 2>"$W/podman-info.err" || skip "podman cannot start here: $(tail -n1 "$W/podman-info.err")"
}

# --- images -----------------------------------------------------------------------------------
torch_pins() { sed -n 's/^TORCH_PINS ?= //p' Makefile; }

build_base() {
    local pins tag codename sources
    pins=$(torch_pins); [ -n "$pins" ] || die "no TORCH_PINS in the Makefile"
    tag=localhost/rlrr-base:$(echo "$pins" | sed 's/==//g; s/ /-/g')  # torch2.14.1-torchvision0.29.1
    BASE=$tag
    if podman image exists "$tag"; then say "base $tag: present"; return; fi
    if ! podman image exists localhost/debian-py:rlrr; then
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
        sources=/etc/apt/sources.list.d/debian.sources; [ -f "$sources" ] || sources=/etc/apt/sources.list
        say "mmdebstrap $codename (mirror of $sources)"
        mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$codename" "$W/rootfs.tar" "$sources"
        podman import -q "$W/rootfs.tar" localhost/debian-py:rlrr >/dev/null
        rm -f "$W/rootfs.tar"
    fi
    say "base $tag: a venv with $pins"
    mkdir -p "$W/base"
    printf '%s\n' 'FROM localhost/debian-py:rlrr' 'ENV PATH=/opt/venv/bin:$PATH' \
        "RUN python3 -m venv /opt/venv && pip install --no-cache-dir $pins" > "$W/base/Containerfile"
    podman build -q --network=host "${CA[@]}" -t "$tag" "$W/base" >/dev/null
}

build_image() {
    local t=$SECONDS old
    old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    # --format docker keeps the HEALTHCHECK (OCI drops it)
    podman build -q --format docker --network=host "${CA[@]}" --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" . >/dev/null
    say "built $IMAGE on $BASE in $((SECONDS - t)) s"
    # the previous build's own layers: storage stays at about one image (~6.3 GB)
    if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
}

# --- the README's request and answer ------------------------------------------------------------
# The answer is the README's JSON line starting {"task":; its task and top_k make the request, and
# its photo is the hymenoptera member the README's `tar -xOf` line extracts.
readme_photo() {
    local member
    member=$(grep -o 'hymenoptera\.tar hymenoptera/[^ ]*\.jpg' README.md | head -n1 | cut -d' ' -f2)
    [ -n "$member" ] || die "README: no 'tar -xOf .../hymenoptera.tar hymenoptera/...jpg' line"
    [ -f "$SHARED/hymenoptera.tar" ] || die "no hymenoptera.tar in ../shared/data (set RLRR_SHARED_DATA=DIR)"
    tar -xOf "$SHARED/hymenoptera.tar" "$member" > "$W/photo.jpg"
}

wait_ready() {  # url, what
    local i
    for i in $(seq 1 180); do
        curl -sf "$1/readyz" >/dev/null && { say "$2 ready after ${i}s"; return 0; }
        sleep 1
    done
    return 1
}

# Same labels and indices; same adapter version and backbone fingerprint; scores within 1e-4
# (float32 CPU kernels differ in the last bits between torch builds and CPUs).
compare_answer() {  # answer file
    python3 - README.md "$1" <<'EOF'
import json, re, sys
readme, got = open(sys.argv[1]).read(), json.load(open(sys.argv[2]))
want = json.loads(re.search(r'^\{"task":.*\}$', readme, re.M).group(0))
keys = ("task", "adapter_version", "backbone_fingerprint")
bad = [k for k in keys if got.get(k) != want[k]]
gp, wp = got["results"][0]["predictions"], want["results"][0]["predictions"]
if [(p["label"], p["index"]) for p in gp] != [(p["label"], p["index"]) for p in wp]:
    bad.append("predictions")
elif max(abs(a["score"] - b["score"]) for a, b in zip(gp, wp)) > 1e-4:
    bad.append("scores")
print("classify:", json.dumps({k: got[k] for k in ("task", "adapter_version", "results")}))
sys.exit(f"differs from the README in {bad}" if bad else 0)
EOF
}

classify_readme() {  # base url
    local task top_k
    task=$(grep -o '^{"task":"[^"]*"' README.md | head -n1 | cut -d'"' -f4)
    top_k=$(grep -m1 '^{"task":' README.md | grep -o '"label"' | wc -l)
    classify "$1" "$task" "$top_k" "$W/photo.jpg" "$W/answer.json"
    compare_answer "$W/answer.json" || die "the README's answer was not served"
}

classify() {  # base url, task, top_k, photo, answer file
    local code
    code=$(curl -s -o "$5" -w '%{http_code}' -X POST "$1/classify?task=$2&top_k=$3" \
        -H 'content-type: image/jpeg' --data-binary @"$4") || true
    [ "$code" = 200 ] || die "classify?task=$2 answered ${code:-nothing}: $(cat "$5" 2>/dev/null)"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- runs -------------------------------------------------------------------------------------
check_run() {
    local port id
    port=$(free_port)
    # stderr into a file: conmon keeps it open, so a pipe would never end
    id=$(podman run -d -p "127.0.0.1:$port:8000" "$IMAGE" 2>"$W/run.err") || { cat "$W/run.err"; die "podman run failed"; }
    quiet < "$W/run.err" >&2
    CLEANUP+=("podman rm -f -v $id")
    wait_ready "http://127.0.0.1:$port" "podman run" || { podman logs "$id" | tail -n 30; die "not ready in 180 s"; }
    classify_readme "http://127.0.0.1:$port"
    podman healthcheck run "$id" >/dev/null || die "the image's HEALTHCHECK fails"
    say "HEALTHCHECK passes"
    podman rm -f -v "$id" >/dev/null 2>&1
}

tiny_imagefolder() {  # a user's folder: 3 CIFAR-10 classes, 8 train / 4 val photos each
    local class i members=()
    rm -rf "$W/data" "$W/cifar10"
    for class in airplane cat ship; do
        for i in 0000 0001 0002 0003 0004 0005 0006 0007; do members+=("cifar10/train/$class/$i.jpg"); done
        for i in 0000 0001 0002 0003; do members+=("cifar10/test/$class/$i.jpg"); done
    done
    tar -xzf "$SHARED/cifar10-jpeg.tar.gz" -C "$W" "${members[@]}"
    mkdir -p "$W/data/tiny3"
    mv "$W/cifar10/train" "$W/data/tiny3/train"
    mv "$W/cifar10/test" "$W/data/tiny3/val"
    chmod -R a+rX "$W/data"
}

check_compose() {
    local port pc url
    port=$(free_port)
    pc=("$W/pc/bin/podman-compose" -p "$PROJECT" -f docker-compose.yml -f deploy/compose.cpu.yml)
    export RLRR_PORT=$port RLRR_DATA_DIR=$W/data
    CLEANUP+=("${pc[*]} --profile train down -v")
    "${pc[@]}" --profile train down -v >/dev/null 2>&1 || true  # what an interrupted run left
    "${pc[@]}" up -d >"$W/compose-up.log" 2>&1 || { cat "$W/compose-up.log"; die "podman-compose up failed"; }
    url=http://127.0.0.1:$port
    wait_ready "$url" "compose app" || { "${pc[@]}" logs app | tail -n 30; die "compose app not ready in 180 s"; }
    classify_readme "$url"
    "${pc[@]}" --profile train run --rm trainer --help >"$W/trainer-help.log" 2>&1 ||
        { tail -n 20 "$W/trainer-help.log"; die "compose trainer --help failed"; }
    grep -q 'train a task (default command)' "$W/trainer-help.log" || die "trainer --help: not the trainer's help"
    say "compose trainer --help: ok"
    tiny_imagefolder
    local t=$SECONDS
    "${pc[@]}" --profile train run --rm trainer --task tiny3 --epochs 1 \
        >"$W/trainer-run.log" 2>&1 || { tail -n 30 "$W/trainer-run.log"; die "training in the container failed"; }
    say "compose trainer: one epoch on tiny3 in $((SECONDS - t)) s; last lines:"
    quiet < "$W/trainer-run.log" | tail -n 4 | sed 's/^/    /'
    classify "$url" tiny3 3 "$W/data/tiny3/val/ship/0000.jpg" "$W/tiny3.json"  # first request, no restart
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); labels = sorted(p["label"] for p in r["results"][0]["predictions"]); assert labels == ["airplane", "cat", "ship"], labels; print("    served:", json.dumps(r["results"][0]))' "$W/tiny3.json"
    say "compose app serves tiny3 (trained in the trainer container) with no restart"
}

cleanup() { local c; for c in "${CLEANUP[@]}"; do eval "$c" >/dev/null 2>&1 || true; done; }

CLEANUP=()
trap cleanup EXIT
install_tools
configure_podman
CA=()  # the host's CA bundle, for pip inside builds (registries behind a TLS-inspecting proxy)
[ -f /etc/ssl/certs/ca-certificates.crt ] && CA=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
readme_photo
build_base
build_image
check_run
check_compose
say "container check passed"
