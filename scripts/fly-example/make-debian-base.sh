#!/usr/bin/env bash
# Makes the `debian:12` base image of examples/fly-go in the strata store: a minimal Debian
# bookworm root filesystem by debootstrap (network needed: deb.debian.org or $MIRROR), tarred
# and imported with `strata import`. Root needed (debootstrap).
#
#   scripts/fly-example/make-debian-base.sh [STRATA_BINARY]
#
# DEBIAN_TAR=FILE keeps the root filesystem tarball there, and reuses it when it exists (no
# debootstrap): a benchmark imports the same base into several fresh stores.
set -euo pipefail
strata=${1:-${STRATA:-strata}}
mirror=${MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

work=$(mktemp -d /tmp/strata-debian.XXXXXX)
trap 'rm -rf "$work"' EXIT
tarball=${DEBIAN_TAR:-$work/rootfs.tar}
if [ ! -s "$tarball" ]; then
    echo "==> debootstrap --variant=minbase bookworm (2-4 minutes)"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # What debootstrap leaves that does not belong in an image: its apt lists and caches (the
    # image's users run apt-get update themselves) and the host's resolv.conf/hostname.
    rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin \
        "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/debootstrap"
    : >"$work/rootfs/etc/resolv.conf"
    # What Docker's official debian images carry (debuerreotype's minimizing config): dpkg
    # without an fsync per unpacked file (a build's RUN layer is made durable once, when it is
    # stored; dpkg's fsyncs made `apt-get install golang` twice as slow under runc here) and
    # apt without translations.
    echo 'force-unsafe-io' >"$work/rootfs/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
    echo 'Acquire::Languages "none";' >"$work/rootfs/etc/apt/apt.conf.d/docker-no-languages"
    echo "==> tar"
    tar --numeric-owner --xattrs -C "$work/rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
echo "==> import as debian:12"
"$strata" import "$tarball" debian:12 \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]'
