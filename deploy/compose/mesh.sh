#!/bin/sh
# Starts, inspects and removes the demo mesh of docker-compose.yml, doing the bootstrap `docker compose up`
# cannot do alone: the controller prints its admin token once, on its first start, and the images have no
# shell. So: start the controller, take the token from its ready line, apply mesh.yaml (services, and the
# Identity resources placing each workload on its node), create one reusable join token per node gateway
# (a gateway killed and started again bootstraps again with it), write each gateway's configuration,
# token and the trust bundle into $QM_STATE/<gateway>/, then start everything else.
#
#   deploy/compose/mesh.sh up          # needs the images (deploy/images/build.sh)
#   deploy/compose/mesh.sh ctl stat    # any `quicmesh ctl` command, run in the controller container
#   deploy/compose/mesh.sh compose ps  # any compose command on the project
#   deploy/compose/mesh.sh down        # removes containers, networks, the controller's volume and $QM_STATE
#
# Environment: QM_PROJECT (compose project name, default quicmesh), QM_STATE (default
# ${TMPDIR:-/tmp}/quicmesh-compose-$QM_PROJECT), QM_MESH / QM_NODE_A / QM_NODE_B (first three octets of
# the three /24 networks, default 10.231.0 / 10.232.0 / 10.233.0), QM_TAG (image tag, default dev),
# QM_NO_LOAD=1 (up without the three load processes: the fault test drives its own).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${QM_PROJECT:=quicmesh}"
: "${QM_STATE:=${TMPDIR:-/tmp}/quicmesh-compose-$QM_PROJECT}"
: "${QM_MESH:=10.231.0}"
: "${QM_NODE_A:=10.232.0}"
: "${QM_NODE_B:=10.233.0}"
: "${QM_TAG:=dev}"
export QM_STATE QM_MESH QM_NODE_A QM_NODE_B QM_TAG

if docker compose version >/dev/null 2>&1; then
    compose() { docker compose -p "$QM_PROJECT" -f "$here/docker-compose.yml" "$@"; }
elif command -v docker-compose >/dev/null 2>&1; then
    compose() { docker-compose -p "$QM_PROJECT" -f "$here/docker-compose.yml" "$@"; }
else
    echo "mesh.sh: neither 'docker compose' nor 'docker-compose' is available" >&2
    exit 2
fi

die() {
    echo "mesh.sh: $*" >&2
    exit 1
}

# The container id of a compose service.
cid() {
    id=$(compose ps -q "$1" 2>/dev/null | head -n 1)
    [ -n "$id" ] || die "no container for service $1"
    echo "$id"
}

# Waits up to $2 seconds until the container of service $1 has printed $3 JSON ready lines (default 1).
wait_ready() {
    want=${3:-1}
    c=$(cid "$1")
    i=0
    while [ "$i" -lt "$(($2 * 5))" ]; do
        n=$(docker logs "$c" 2>/dev/null | grep -c '"event":"ready"' || true)
        [ "$n" -ge "$want" ] && return 0
        sleep 0.2
        i=$((i + 1))
    done
    docker logs "$c" 2>&1 | tail -n 20 >&2
    die "$1 printed no ready line within $2 s"
}

ctl() {
    [ -s "$QM_STATE/admin.token" ] || die "no admin token in $QM_STATE/admin.token (run mesh.sh up first)"
    docker exec -i -e QUICMESH_ADMIN_TOKEN="$(cat "$QM_STATE/admin.token")" "$(cid controller)" \
        /usr/bin/quicmesh ctl --controller 127.0.0.1:7443 --ca /data/trust-bundle.pem "$@"
}

# Writes $QM_STATE/$1/{proxy.toml,join.token,trust-bundle.pem} for node gateway $1: its identity is the
# service account $1 of namespace nodes (the node's, which serves nothing itself; quicmesh-system is the controller's own), $2 the
# address it registers for its workloads' endpoints (its mesh address), $3 the rest of its config.
gateway_dir() {
    d=$QM_STATE/$1
    mkdir -p "$d"
    chmod 0755 "$d"
    ctl tokens create nodes "$1" --reusable --ttl 720h -o json \
        | sed -n 's/^ *"token": *"\([^"]*\)".*/\1/p' > "$d/join.token"
    [ -s "$d/join.token" ] || die "no join token for $1"
    cp "$QM_STATE/trust-bundle.pem" "$d/trust-bundle.pem"
    {
        printf 'drain_grace = "5s"\n\n[controller]\naddress = "controller:7443"\n'
        printf 'trust_bundle = "trust-bundle.pem"\njoin_token_file = "join.token"\n'
        printf 'identity = "spiffe://mesh.local/ns/nodes/sa/%s"\nreport_interval = "1s"\n' "$1"
        printf 'advertise = "%s"\n' "$2"
        printf '\n[admin]\nlisten = "0.0.0.0:15000"\n\n[inbound]\nlisten = "0.0.0.0:4433"\n%s\n' "$3"
    } > "$d/proxy.toml"
    # The proxy runs as uid 65532: readable by it (the parent directory stays owner-only).
    chmod 0644 "$d/proxy.toml" "$d/join.token" "$d/trust-bundle.pem"
}

# A [[workload]]: name (= its service account in demo, and the service it serves), app address.
workload() {
    printf '\n[[workload]]\nname = "%s"\nidentity = "spiffe://mesh.local/ns/demo/sa/%s"\n' "$1" "$1"
    printf 'sources = ["%s"]\nports = [{ port = 8080, app = "%s:8080" }]\n' "$2" "$2"
}

outbound() {
    printf '\n[[outbound]]\nlisten = "0.0.0.0:%s"\nservice = "%s.demo"\nport = 8080\n' "$1" "$2"
}

up() {
    mkdir -p "$QM_STATE"
    chmod 0700 "$QM_STATE"
    compose up -d controller
    wait_ready controller 30
    if [ ! -s "$QM_STATE/admin.token" ]; then
        token=$(docker logs "$(cid controller)" 2>/dev/null \
            | sed -n 's/.*"admin_token":"\([^"]*\)".*/\1/p' | head -n 1)
        [ -n "$token" ] || die "the controller's ready line has no admin token (a volume of an earlier mesh?)"
        (umask 077 && echo "$token" > "$QM_STATE/admin.token")
    fi
    docker cp "$(cid controller):/data/trust-bundle.pem" "$QM_STATE/trust-bundle.pem"
    ctl apply -f - < "$here/mesh.yaml"
    gateway_dir gateway-a "$QM_MESH.10:4433" \
        "$(outbound 9001 web)$(outbound 9002 api)$(outbound 9003 db)$(workload web "$QM_NODE_A.10")$(workload loadgen "$QM_NODE_A.20")"
    gateway_dir gateway-b "$QM_MESH.11:4433" "$(workload api "$QM_NODE_B.11")$(workload db "$QM_NODE_B.12")"
    compose up -d web loadgen api db gateway-a gateway-b
    # A gateway prints its ready line once it holds its own certificate and every workload's.
    for p in gateway-a gateway-b; do
        wait_ready "$p" 30
    done
    if [ "${QM_NO_LOAD:-0}" != 1 ]; then
        compose up -d load-web load-api load-db
    fi
    echo "mesh up: project $QM_PROJECT, state in $QM_STATE; try: $0 ctl stat"
}

case ${1:-} in
    up) up ;;
    ctl) shift; ctl "$@" ;;
    compose) shift; compose "$@" ;;
    down)
        compose down -v --remove-orphans
        rm -rf "$QM_STATE"
        ;;
    *)
        echo "usage: $0 up | ctl ARGS... | compose ARGS... | down" >&2
        exit 2
        ;;
esac
