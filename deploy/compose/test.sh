#!/bin/sh
# Fault test of the compose mesh (docker-compose.yml, mesh.sh): starts it under a unique project name and
# networks, drives load from the load generator's app container through node A's gateway to web (on node
# A), api and db (on node B), and injects three faults, one per phase: `docker kill` (SIGKILL) of node B's
# gateway, kept down 4 s, and `docker start` again; `docker network disconnect` of gateway-b from the mesh
# network and reconnect; `docker restart` of the controller. After each phase it waits (bounded) until
# requests through the mesh succeed again, and accounts for every request:
#
#   - the load generator's requests (its JSON summaries and curl's probes, each ok or failed) equal the
#     requests gateway-a counted on its outbound side, per service and outcome (quicmesh_requests_total by
#     status code; gateway-a is never the one killed, so its counters cover the whole run);
#   - no acknowledged request is lost: each server answered at least every request the load generator saw
#     succeed, and at most every request sent (`bench serve --stats-listen`).
#
# The host is not a workload of any gateway (gateway-a attributes connections by source address), so the
# probes run in the load generator's network namespace (nsenter, hence root). Prints what it measured;
# exits non-zero on the first broken check. Skipped, with the reason, without Docker, Compose, curl,
# python3, nsenter or root. Every wait is bounded; everything it made is removed on exit.
#
#   deploy/compose/test.sh                                   # builds the images first (deploy/images/build.sh)
#   QUICMESH_BIN_DIR=target/release deploy/compose/test.sh   # from binaries already built
set -eu
here=$(cd "$(dirname "$0")" && pwd)
skip() {
    echo "skipped: $*"
    exit 0
}
docker info >/dev/null 2>&1 || skip "Docker is not available (docker info failed)"
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
    || skip "neither 'docker compose' nor 'docker-compose' is installed"
command -v curl >/dev/null 2>&1 || skip "curl is not installed"
command -v python3 >/dev/null 2>&1 || skip "python3 is not installed"
command -v nsenter >/dev/null 2>&1 || skip "nsenter is not installed"
[ "$(id -u)" = 0 ] || skip "the probes enter the load generator's network namespace (nsenter): run as root"

# QM_SKIP_BUILD=1: the images are already built from these binaries (cargo's test runs images/test.sh first).
[ "${QM_SKIP_BUILD:-0}" = 1 ] || "$here/../images/build.sh"

# A unique project, state directory and three /24 networks (picked among unused ones).
export QM_PROJECT="qmtest$$"
QM_STATE=$(mktemp -d)
export QM_STATE
used=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' $(docker network ls -q) 2>/dev/null || true)
n=$(($$ % 200 + 20))
tries=0
while echo "$used" | grep -q -e "10\.231\.$n\." -e "10\.232\.$n\." -e "10\.233\.$n\."; do
    n=$(((n + 1) % 250))
    tries=$((tries + 1))
    [ "$tries" -lt 250 ] || { echo "FAIL: no free 10.231.x.0/24, 10.232.x.0/24 and 10.233.x.0/24"; exit 1; }
done
export QM_MESH="10.231.$n" QM_NODE_A="10.232.$n" QM_NODE_B="10.233.$n" QM_NO_LOAD=1
mesh() { "$here/mesh.sh" "$@"; }
loaders=""
cleanup() {
    for c in $loaders; do docker rm -f -v "$c" >/dev/null 2>&1 || true; done
    mesh compose down -v -t 1 --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$QM_STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
    echo "FAIL: $*"
    for s in controller gateway-a gateway-b; do
        echo "--- logs $s"
        docker logs "$(mesh compose ps -q $s)" 2>&1 | tail -n 15 || true
    done
    exit 1
}

t0=$(date +%s)
mesh up >/dev/null 2>"$QM_STATE/up.log" || { cat "$QM_STATE/up.log"; fail "mesh.sh up failed"; }
echo "ok: mesh up in $(($(date +%s) - t0)) s (project $QM_PROJECT, networks mesh $QM_MESH.0/24, node-a $QM_NODE_A.0/24, node-b $QM_NODE_B.0/24)"
cid_of() { mesh compose ps -q "$1"; }
lg=$(cid_of loadgen)
lg_pid=$(docker inspect -f '{{.State.Pid}}' "$lg")
gateway_b=$(cid_of gateway-b)
controller=$(cid_of controller)
gw_admin="$QM_MESH.10:15000"
gw_out="$QM_NODE_A.2"
acct=$QM_STATE/accounting.json
echo '{}' > "$acct"

# The accounting, kept by python3 in $acct: per service, requests that succeeded and failed as the client
# side saw them. `account load SERVICE FILE` adds a load generator's JSON summary (its warm-up request per
# connection included: the summary counts it as a connection, or as a connect error if it failed);
# `account curl SERVICE CODE` one probe.
account() {
    python3 - "$acct" "$@" <<'PY'
import json, sys
path, kind, svc = sys.argv[1], sys.argv[2], sys.argv[3]
a = json.load(open(path))
s = a.setdefault(svc, {"ok": 0, "failed": 0})
if kind == "load":
    lines = [l for l in open(sys.argv[4]) if l.startswith("{")]
    if not lines:
        sys.exit("the load generator printed no summary")
    r = json.loads(lines[-1])
    errors = r["errors"]
    # Requests never sent (past the run's deadline) reached no proxy.
    not_sent = errors.get("not-sent", 0)
    s["ok"] += r["ok"] + r["connected"]
    s["failed"] += sum(errors.values()) - not_sent
    lat = r["latency_ms"]
    print("%d ok, errors %s, latency p99 %.1f ms, max %.1f ms" % (r["ok"], json.dumps(errors), lat["p99"], lat["max"]), end="")
else:
    if sys.argv[4] == "200":
        s["ok"] += 1
    else:
        s["failed"] += 1
json.dump(a, open(path, "w"))
PY
}

# Checks every service's figures: client side = gateway-a's outbound metrics (2xx ok, any other status
# failed; a failure the gateway answers itself has no upstream latency, so the duration histogram would
# miss it), ok <= server count <= ok + failed.
check_accounts() {
    curl -sf --max-time 5 "http://$gw_admin/metrics" > "$QM_STATE/metrics" || fail "no metrics from gateway-a"
    for s in web:$QM_NODE_A.10 api:$QM_NODE_B.11 db:$QM_NODE_B.12; do
        curl -sf --max-time 5 "http://${s#*:}:9100/stats" > "$QM_STATE/stats-${s%%:*}" \
            || fail "no request count from the ${s%%:*} server"
    done
    python3 - "$acct" "$QM_STATE" "$1" <<'PY' || fail "accounting after $1"
import json, re, sys
acct, state, phase = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
metrics = open(state + "/metrics").read()
bad = False
for svc in ("web", "api", "db"):
    a = acct.get(svc, {"ok": 0, "failed": 0})
    by_status = {}
    for m in re.finditer(r'^quicmesh_requests_total\{([^}]*)\} (\d+)', metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("direction") == "outbound" and labels.get("service") == svc + ".demo":
            code = labels["status_code"]
            by_status[code] = by_status.get(code, 0) + int(m.group(2))
    proxy_ok = sum(n for code, n in by_status.items() if code.startswith("2"))
    proxy_failed = sum(by_status.values()) - proxy_ok
    served = json.load(open("%s/stats-%s" % (state, svc)))["requests"]
    ok = proxy_ok == a["ok"] and proxy_failed == a["failed"] and a["ok"] <= served <= a["ok"] + a["failed"]
    bad |= not ok
    print("  %s %s: client %d ok + %d failed = %d sent; gateway-a %d ok + %d failed %s; server answered %d"
          % ("ok:" if ok else "MISMATCH:", svc, a["ok"], a["failed"], a["ok"] + a["failed"], proxy_ok,
             proxy_failed, json.dumps(by_status), served))
sys.exit(1 if bad else 0)
PY
    echo "ok: every request accounted for after $1"
}

# One phase: load on the three services for $1 seconds, the fault ($2, a shell function) two seconds in.
phase() {
    name=$2
    for s in web:9001 api:9002 db:9003; do
        c="$QM_PROJECT-load-${s%%:*}"
        loaders="$loaders $c"
        docker run -d --name "$c" --network "container:$lg" "quicmesh-controller:${QM_TAG:-dev}" \
            bench load --target "$gw_out:${s#*:}" --rate 50 --connections 4 --duration "${1}s" \
            --timeout 15s --json >/dev/null
    done
    sleep 2
    "$name"
    for s in web api db; do
        c="$QM_PROJECT-load-$s"
        # The run's own bound: duration + its 15 s timeout; then a margin.
        code=$(timeout "$(($1 + 25))" docker wait "$c" || echo timeout)
        docker logs "$c" > "$QM_STATE/load-$s.out" 2>/dev/null || true
        docker rm -f -v "$c" >/dev/null 2>&1 || true
        [ "$code" = 0 ] || { tail -n 5 "$QM_STATE/load-$s.out"; fail "the $s load generator exited with $code in phase $name"; }
        printf '  %s load (%s): ' "$s" "$name"
        account load "$s" "$QM_STATE/load-$s.out" || fail "no summary from the $s load generator"
        echo
    done
}

# Waits up to 30 s until 5 requests in a row through the mesh to service $1 succeed; every probe counted.
recover() {
    start=$(date +%s)
    port=$2
    streak=0
    i=0
    while [ "$streak" -lt 5 ]; do
        [ "$i" -lt 300 ] || fail "$1 not reachable through the mesh 30 s after $3"
        code=$(nsenter -t "$lg_pid" -n curl -s -o /dev/null -w '%{http_code}' --max-time 15 -d probe "http://$gw_out:$port/probe" || true)
        account curl "$1" "$code"
        if [ "$code" = 200 ]; then streak=$((streak + 1)); else streak=0; sleep 0.1; fi
        i=$((i + 1))
    done
    echo "ok: $1 answers through the mesh $(($(date +%s) - start)) s after $3 was healed ($i probes)"
}

no_fault() { :; }
kill_gateway() {
    docker kill -s KILL "$gateway_b" >/dev/null
    sleep 4
    [ "$(docker inspect -f '{{.State.Running}}' "$gateway_b")" = false ] || fail "gateway-b survived SIGKILL"
    docker start "$gateway_b" >/dev/null
}
disconnect() {
    docker network disconnect "${QM_PROJECT}_mesh" "$gateway_b"
    sleep 2
    docker network connect --ip "$QM_MESH.11" "${QM_PROJECT}_mesh" "$gateway_b"
}
restart_controller() {
    docker restart -t 10 "$controller" >/dev/null
}

# `ctl stat` shows traffic on the three services (from the proxies' reports), within 10 s.
stat_shows_traffic() {
    i=0
    while ! mesh ctl stat -o json 2>/dev/null | python3 -c '
import json, sys
rows = json.load(sys.stdin)["rows"]
sys.exit(0 if {r["service"] for r in rows if r["requests"] > 0} >= {"web.demo", "api.demo", "db.demo"} else 1)'; do
        i=$((i + 1))
        [ "$i" -lt 20 ] || fail "ctl stat does not show traffic on web, api and db $1"
        sleep 0.5
    done
    echo "ok: ctl stat shows web, api and db $1:"
    mesh ctl stat | sed 's/^/  /'
}

phase 4 no_fault
check_accounts "a phase without faults"
stat_shows_traffic "under load"
for f in kill_gateway disconnect restart_controller; do
    phase 6 "$f"
    recover web 9001 "$f"
    recover api 9002 "$f"
    recover db 9003 "$f"
    check_accounts "$f"
done
# The restarted controller gets the proxies' reports again.
stat_shows_traffic "after the controller restart"
echo "PASS in $(($(date +%s) - t0)) s"
