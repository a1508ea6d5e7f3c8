#!/usr/bin/env bash
# Install the real launchers the `launcher` tests run (OpenMPI, MPICH, SLURM + munge) and start
# a single-node SLURM on this host. CI runs it before the tests; a developer can run it by hand
# (as root, on a machine without a SLURM of its own):
#
#     sudo bash tests/launchers/setup.sh          # install + start; idempotent
#     sudo bash tests/launchers/setup.sh stop     # stop the daemons
#
# The config goes to /etc/slurm/slurm.conf unless one that this script did not write exists
# (then it stops with a message rather than replace a real cluster's config).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${DEVLAYER_SLURM_STATE:-/var/tmp/devlayer-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# devlayer's single-node SLURM"

stop() {
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
}

if [ "${1:-}" = "stop" ]; then
    stop
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "tests/launchers/setup.sh: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

need=()
command -v mpirun.openmpi >/dev/null || need+=(openmpi-bin)
command -v mpiexec.hydra >/dev/null || need+=(mpich)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
# Not a launcher: the C++ compiler torch.compile needs for CPU code (tests/e2e/test_compile.py).
command -v c++ >/dev/null || need+=(g++)
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# munge: the key comes with the package; the daemon runs as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf: ours, or none yet.
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -q "$MARK"; then
    echo "tests/launchers/setup.sh: $CONF exists and was not written by this script;" \
        "not replacing a real SLURM config" >&2
    exit 1
fi
host="$(hostname -s)"
mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" "$HERE/slurm.conf.in" >"$CONF.new"
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
    mv "$CONF.new" "$CONF"
    stop  # restart with the new config
else
    rm -f "$CONF.new"
fi

pgrep -x slurmctld >/dev/null || slurmctld -c
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 100); do
    node_state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
    case "$node_state" in
        idle* | mixed* | allocated*) break ;;
        down* | drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
node_state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
case "$node_state" in
    idle* | mixed* | allocated*) ;;
    *)
        echo "tests/launchers/setup.sh: SLURM node $host is '$node_state', not idle;" \
            "see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
        exit 1
        ;;
esac
echo "launchers ready: $(mpirun.openmpi --version | head -1); MPICH $(mpiexec.hydra --version \
    | awk '/Version:/ {print $2; exit}'); $(sinfo --version) node $host $node_state"
