#!/usr/bin/env bash
# The test command (README "Set-up"): installs what the tests need on a fresh
# Debian 12 machine, builds sshpump, and runs the whole suite, slow tests
# included. Needs root (sshd, PostgreSQL, a test login user).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[test,bench]'
# The C pump must stay warning-free.
for src in csrc/pump.c csrc/conn.c csrc/flow.c csrc/mux.c; do
    gcc -std=gnu11 -fsyntax-only -Wall -Wextra -Werror -Icsrc "$src"
    gcc -std=gnu11 -fsyntax-only -Wall -Wextra -Werror -DPUMP_DEBUG -Icsrc "$src"
done
python3 -m pytest -q -ra -p no:cacheprovider tests "$@"
