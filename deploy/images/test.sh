#!/bin/sh
# Starts the images as containers and checks them from outside: the controller prints its ready line, a
# static-mode proxy (certificates made by the controller image's `quicmesh ca`) prints its ready line and
# answers /ready from another network namespace (the host, over the Docker bridge), and `docker stop`
# drains it: exit code 0 and "proxy stopped" in its log. Skipped, with the reason, where Docker is not
# available. Every wait is bounded.
#
#   deploy/images/test.sh                                   # builds the images first (build.sh)
#   QUICMESH_BIN_DIR=target/release deploy/images/test.sh   # from binaries already built
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! docker info >/dev/null 2>&1; then
    echo "skipped: Docker is not available (docker info failed)"
    exit 0
fi
if ! command -v curl >/dev/null 2>&1; then
    echo "skipped: curl is not installed"
    exit 0
fi
"$here/build.sh"
id=qmtest-$$
dir=$(mktemp -d)
cleanup() {
    docker rm -f -v "$id-controller" "$id-proxy" >/dev/null 2>&1 || true
    docker network rm "$id" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for c in "$id-controller" "$id-proxy"; do
        echo "--- docker logs $c"
        docker logs "$c" 2>&1 | tail -20 || true
    done
    exit 1
}
# Waits up to $2 seconds for container $1 to print its JSON ready line.
wait_ready() {
    i=0
    while [ "$i" -lt "$(($2 * 10))" ]; do
        if docker logs "$1" 2>/dev/null | grep -q '"event":"ready"'; then
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    fail "$1 printed no ready line within $2 s"
}

docker network create "$id" >/dev/null
docker run -d --name "$id-controller" --network "$id" "quicmesh-controller:${QUICMESH_IMAGE_TAG:-dev}" \
    controller --data-dir /data --listen 0.0.0.0:7443 --trust-domain mesh.local >/dev/null
wait_ready "$id-controller" 30
echo "ok: controller ready"

# A development CA and a leaf, made by the image's own CLI, as the image's user.
chmod 0777 "$dir"
docker run --rm -v "$dir:/pki" "quicmesh-controller:${QUICMESH_IMAGE_TAG:-dev}" ca init --dir /pki >/dev/null
docker run --rm -v "$dir:/pki" "quicmesh-controller:${QUICMESH_IMAGE_TAG:-dev}" \
    ca issue --dir /pki --id spiffe://mesh.local/ns/default/sa/echo --out /pki/server >/dev/null
cat > "$dir/proxy.toml" <<TOML
drain_grace = "2s"
[identity]
cert = "server.pem"
key = "server.key"
trust_bundle = "ca.pem"
[admin]
listen = "0.0.0.0:15000"
[inbound]
listen = "0.0.0.0:4433"
ports = [{ port = 7, app = "127.0.0.1:7" }]
TOML
chmod 0644 "$dir/proxy.toml"
docker run -d --name "$id-proxy" --network "$id" -v "$dir:/etc/quicmesh:ro" "quicmesh-proxy:${QUICMESH_IMAGE_TAG:-dev}" >/dev/null
wait_ready "$id-proxy" 30
echo "ok: proxy ready"
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id-proxy")
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$ip:15000/ready" || true)
[ "$code" = 200 ] || fail "proxy /ready answered $code from the host"
echo "ok: proxy /ready 200 over the bridge"

docker stop -t 15 "$id-proxy" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$id-proxy")
[ "$exit_code" = 0 ] || fail "proxy exited with $exit_code on docker stop"
docker logs "$id-proxy" 2>&1 | grep -q "proxy stopped" || fail "proxy did not drain on docker stop"
echo "ok: proxy drained on docker stop (exit 0)"
echo "PASS"
