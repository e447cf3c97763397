#!/bin/sh
# Builds the quicmesh images locally, with no registry: FROM scratch with the release binaries and the
# shared libraries they link (glibc, libgcc_s, libm; ldd lists them), plus a passwd entry for the
# non-root user the images run as. Tags: quicmesh-controller:dev, quicmesh-proxy:dev.
#
#   deploy/images/build.sh            # builds the binaries with cargo first
#   QUICMESH_BIN_DIR=target/release deploy/images/build.sh   # uses binaries already built there
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
tag=${QUICMESH_IMAGE_TAG:-dev}
if [ -z "${QUICMESH_BIN_DIR:-}" ]; then
    (cd "$repo" && cargo build --release --bin quicmesh --bin quicmesh-proxy)
    QUICMESH_BIN_DIR=${CARGO_TARGET_DIR:-$repo/target}/release
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for role in controller proxy; do
    case $role in
        controller) bin=quicmesh ;;
        proxy) bin=quicmesh-proxy ;;
    esac
    root=$work/$role/rootfs
    mkdir -p "$root/usr/bin" "$root/etc" "$root/tmp" "$root/etc/quicmesh" "$work/$role/data"
    cp "$QUICMESH_BIN_DIR/$bin" "$root/usr/bin/$bin"
    # Every library the binary links, at the path the loader looks for it.
    for lib in $(ldd "$QUICMESH_BIN_DIR/$bin" | awk '/=>/ { print $3 } /^[[:space:]]*\/lib/ { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    printf 'root:x:0:0::/:/nonexistent\nquicmesh:x:65532:65532::/data:/nonexistent\n' > "$root/etc/passwd"
    printf 'root:x:0:\nquicmesh:x:65532:\n' > "$root/etc/group"
    chmod 1777 "$root/tmp"
    cp "$here/Dockerfile.$role" "$work/$role/Dockerfile"
    docker build -q -t "quicmesh-$role:$tag" "$work/$role" >/dev/null
    echo "built quicmesh-$role:$tag"
done
