#!/usr/bin/env bash
# Install the Debian packages the tests need, when missing:
#   postgresql  Airflow's metadata DB in the live-Airflow tests (tests/e2e)
#   chromium    the headless browser of the progress-page test
#   e2fsprogs   chattr, which makes a folder read-only even for root (a shard's
#               "real" failure in the tests)
#   redis-server  the Celery broker of `bash scripts/airflow.sh --celery` and
#               the live Celery tests
# Idempotent: when every package is installed it changes nothing and needs no
# network. Without apt-get, or without root or password-less sudo, it says so
# and installs nothing; the tests that need a missing package are then skipped
# with that reason.
#
#   bash scripts/system-deps.sh                 # all of the above
#   bash scripts/system-deps.sh postgresql      # just these
set -euo pipefail
packages=("$@")
if [ ${#packages[@]} -eq 0 ]; then
    packages=(postgresql chromium e2fsprogs redis-server)
fi
missing=()
for pkg in "${packages[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != "installed" ]; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get here; install ${missing[*]} by hand (tests needing them are skipped)" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "system-deps: not root and no password-less sudo; install ${missing[*]} by hand (tests needing them are skipped)" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
# Installing postgresql (or redis-server) would start its default server and
# leave it running; the tests start their own. Forbid service starts during the
# install, unless the machine already has a policy (Docker images do).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    "${as_root[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
