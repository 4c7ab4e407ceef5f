#!/usr/bin/env bash
# Install the system packages the sshpump test bed needs (Debian 12, run as root).
# Idempotent: safe to run repeatedly.  Does not start any system service.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Wait for a concurrently running apt/dpkg (e.g. a background provisioning job).
for _ in $(seq 1 600); do
    if fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1; then
        sleep 1
    else
        break
    fi
done

PKGS=(
    openssh-server      # /usr/sbin/sshd
    openssh-client      # ssh, ssh-keygen, ssh-keyscan, ssh-agent, ssh-add
    postgresql-15       # /usr/lib/postgresql/15/bin/{initdb,pg_ctl,postgres,pgbench}
    postgresql-client-15  # psql
    postgresql-contrib  # pgbench lives in postgresql-15 / contrib on Debian 12
    sshpass             # optional: password auth with the OpenSSH client
    passwd              # chpasswd, useradd
    util-linux          # runuser
    psmisc              # fuser
    procps
    iperf3              # two-way traffic test (tests/test_bidir.py)
    iproute2            # ip netns / veth: the partition tests (testbed/netns.py)
    haproxy             # the scale-out recipe: two sshpumps behind HAProxy (tests/test_haproxy.py)
    tmux                # sshpump status --watch in a real terminal (tests/test_status.py)
    curl                # scraping /metrics as a user would (tests/test_metrics.py); SOCKS client (tests/test_socks.py)
    proxychains4        # psql through -D (tests/test_socks.py)
    netcat-openbsd      # ProxyCommand nc %h %p (tests/test_jump.py)
    # building sshpump's patched libssh2 (csrc/build_libssh2.py)
    gcc
    patch
    libssl-dev          # OpenSSL headers (the library itself is ssh2-python's)
    zlib1g-dev
)

apt-get update
# policy-rc.d: stop maintainer scripts from trying to start services.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$POLICY"' EXIT
apt-get install -y --no-install-recommends "${PKGS[@]}"

# Sanity: the binaries the test bed uses.
PGBIN=/usr/lib/postgresql/15/bin
for b in /usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /usr/bin/ssh-agent /usr/bin/ssh-add \
         "$PGBIN/initdb" "$PGBIN/pg_ctl" "$PGBIN/postgres" "$PGBIN/pgbench" "$PGBIN/psql"; do
    if [ ! -x "$b" ]; then
        echo "install-system-deps.sh: missing $b" >&2
        exit 1
    fi
done

# Login user for the test sshd.
if ! id -u sshpump-test >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --comment "sshpump test user" sshpump-test
fi
# useradd leaves the account locked ("!"); sshd with UsePAM no refuses locked
# accounts even for pubkey auth.  Give it a random password (the test bed sets
# a fresh one per run anyway).
echo "sshpump-test:$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" | chpasswd

# Privilege-separation directory sshd insists on.
mkdir -p /run/sshd
chmod 0755 /run/sshd

# Make sure no distro-created cluster or sshd was started by the package scripts
# (harmless if nothing is running).
echo "install-system-deps.sh: done"
