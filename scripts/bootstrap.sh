#!/usr/bin/env bash
# Install what tagstream needs on a Debian machine (root or sudo): redis-server from Debian, the Python package with
# its training and test extras. Java 17+ and Maven must be present (Kafka's jars are fetched by `tagstream stack up`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

echo "== versions"
python3 --version
java -version 2>&1 | sed -n 1p || echo "java: missing (install a JDK 17+, e.g. apt-get install -y openjdk-17-jre-headless)"
mvn -v 2>/dev/null | sed -n 1p || echo "mvn: missing (apt-get install -y maven)"
redis-server --version 2>/dev/null || echo "redis-server: missing (installing it)"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== apt-get install redis-server"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
    # The package may start a system Redis on 6379; the stack runs its own there.
    if command -v service >/dev/null 2>&1; then $SUDO service redis-server stop >/dev/null 2>&1 || true; fi
fi

if ! python3 -c "import tagstream, tensorflow, pytest" >/dev/null 2>&1 || [ "${TAGSTREAM_REINSTALL:-}" = 1 ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "== apt-get install python3-pip"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y python3-pip
    fi
    echo "== pip install -e '.[train,dev]'"
    # Into whatever python3 comes first on PATH (a virtualenv or pyenv Python is used as it is). Debian's own Python
    # refuses installs outside a virtualenv (PEP 668, "externally-managed-environment"); this machine is tagstream's.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --progress-bar off -e '.[train,dev]'
fi
