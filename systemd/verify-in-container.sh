#!/usr/bin/env bash
# Verify the duet units under a real systemd: boot Debian bookworm in systemd-nspawn, install
# duet into it with `duet install --root`, drive the follower against the sim on the host, and
# check, with assertions on what systemctl and the journal report:
#   1. duet-follower.service (Type=notify) is active only after READY=1, its STATUS= text
#      shows in `systemctl status`, and it never becomes active when the motors don't answer;
#   2. the watchdog (WatchdogSec=2s) kills a stalled (SIGSTOPped) follower and it restarts;
#   3. duet-planner.service restarts on its own while the follower stays active, same PID;
#   4. duet.target starts both at boot, and stop/start of the target stops/starts both.
# Needs root, a built .venv in the checkout, debootstrap and systemd-nspawn (apt-get install
# debootstrap systemd-container); the first run fetches Debian (~3 min), later runs reuse it.
# Takes about 2 minutes after that. Not part of the test suite.
#
#   sudo systemd/verify-in-container.sh            # WORK=/tmp/duet-nspawn by default
#
# The service manager only sees the binds below; the units run as shipped except for one
# container-only drop-in (zz-container.conf), printed at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/duet-nspawn}
ROOTFS=$WORK/rootfs
RUN=$WORK/run          # the host sim's run dir = /run/duet in the container (camera ipc)
VENV=$REPO/.venv
PY=$VENV/bin/python
UNITS=$ROOTFS/etc/systemd/system

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, nspawn)"
[[ -x $PY ]] || die "no virtualenv at $VENV (make venv)"
for tool in debootstrap systemd-nspawn nsenter systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install debootstrap systemd-container"
done

SIM_PGID="" NSPAWN_PID="" INIT=""
cleanup() {
    if [[ -n $INIT ]]; then nsenter -t "$INIT" -a systemctl poweroff >/dev/null 2>&1 || true; fi
    if [[ -n $NSPAWN_PID ]]; then
        for _ in $(seq 1 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
        kill "$NSPAWN_PID" 2>/dev/null || true
    fi
    if [[ -n $SIM_PGID ]]; then kill -CONT -- "-$SIM_PGID" 2>/dev/null || true
        kill -TERM -- "-$SIM_PGID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 -- "-$SIM_PGID" 2>/dev/null || break; sleep 0.2; done
    fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ the container's tree
if [[ ! -x $ROOTFS/usr/lib/systemd/systemd ]]; then
    say "debootstrap bookworm into $ROOTFS (minutes)"
    mkdir -p "$WORK"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3 bookworm \
        "$ROOTFS" >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed: $WORK/debootstrap.log"
fi
rm -rf "$UNITS"/duet* "$UNITS"/multi-user.target.wants/duet.target "$ROOTFS"/etc/duet \
    "$ROOTFS"/var/lib/duet "$RUN" "$WORK/bundle"
mkdir -p "$RUN"

say "bundle, robot config, duet install --root"
"$PY" -c "import sys; sys.path.insert(0, '$REPO/tests'); from pathlib import Path
from onnx_bundle import make_bundle; make_bundle(Path('$WORK/bundle'))"
"$PY" - "$REPO/configs/sim.yaml" "$WORK/robot.yaml" <<'EOF'
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["bus"]["device"] = "/dev/ttyDUET0"   # the udev name; bound to the sim's pty below
cfg["sim"]["enabled"] = False
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
EOF
(cd "$REPO" && "$VENV/bin/duet" install --root "$ROOTFS" --prefix /opt/duet --no-venv \
    --config "$WORK/robot.yaml" --bundle "$WORK/bundle")
# What a live install does after writing the files (the container has no udev).
systemd-sysusers --root="$ROOTFS" >/dev/null
systemd-tmpfiles --root="$ROOTFS" --create "$ROOTFS/etc/tmpfiles.d/duet.conf"
ln -sfn "$VENV" "$ROOTFS/opt/duet/venv"   # ExecStart stays /opt/duet/venv/bin/duet

# The checkout and the venv's base interpreter are bound in at their host paths. When one
# lives under /root or /home, ProtectHome=yes hides it (and /root is 0700): expose just that
# tree on a tmpfs home. The only relaxation of the shipped hardening.
BASE=$("$PY" -c 'import sys; print(sys.base_prefix)')
BINDS=(--bind="$REPO" --bind-ro="$BASE")
HOMED=()
for p in "$REPO" "$BASE"; do [[ $p == /root/* || $p == /home/* ]] && HOMED+=("$p"); done
for unit in duet-follower duet-planner; do
    mkdir -p "$UNITS/$unit.service.d"
    {
        echo "# container only: the bind-mounted venv lives under a home directory"
        echo "[Service]"
        if ((${#HOMED[@]})); then
            echo "ProtectHome=tmpfs"
            echo "BindReadOnlyPaths=${HOMED[*]}"
        fi
    } >"$UNITS/$unit.service.d/zz-container.conf"
done

# ------------------------------------------------------------------ the sim on the host
say "duet sim on the host (run dir $RUN)"
# umask 000: the sim's camera socket must be connectable by the container's duet user.
(umask 000; cd "$REPO"; MUJOCO_GL=egl exec setsid "$VENV/bin/duet" sim --config "$WORK/robot.yaml" \
    --set run_dir="$RUN" --set sim.enabled=true >"$WORK/sim.out" 2>"$WORK/sim.err") &
SIM_PGID=$!
for _ in $(seq 1 100); do [[ -s $WORK/sim.out ]] && break; sleep 0.2; done
PTY=$(readlink -f "$(head -n1 "$WORK/sim.out")")
[[ $PTY == /dev/pts/* ]] || die "sim gave no pty: $(cat "$WORK/sim.out" "$WORK/sim.err")"
# as udev sets a USB serial adapter: root:dialout 0660 (the follower runs as duet, in dialout)
chgrp dialout "$PTY" && chmod 0660 "$PTY"
echo "motor bus: $PTY -> /dev/ttyDUET0 in the container"

# ------------------------------------------------------------------ boot
say "boot the container"
systemd-nspawn -D "$ROOTFS" --boot --register=no --keep-unit --console=passive \
    "${BINDS[@]}" --bind="$RUN":/run/duet --bind="$PTY":/dev/ttyDUET0 \
    >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
for _ in $(seq 1 100); do INIT=$(pgrep -P "$NSPAWN_PID" -x systemd || true); [[ -n $INIT ]] && break
    sleep 0.2; done
[[ -n $INIT ]] || die "container did not boot: $(cat "$WORK/nspawn.log")"
C=(nsenter -t "$INIT" -a)
sctl() { "${C[@]}" systemctl "$@"; }
prop() { sctl show -p "$2" --value "$1"; }
state() { echo "$(prop "$1" ActiveState)/$(prop "$1" SubState)"; }
wait_active() {  # unit, seconds
    for _ in $(seq 1 $(($2 * 10))); do [[ $(prop "$1" ActiveState) == active ]] && return 0
        sleep 0.1; done
    sctl status "$1" --no-pager -l | tail -20; die "$1 not active within $2 s"
}
journal_since() { "${C[@]}" journalctl -o short-monotonic --no-pager --since "@$1" "${@:2}"; }
# until PID 1 answers on its bus and boot is done (degraded is fine here)
for _ in $(seq 1 150); do
    [[ $(sctl is-system-running --wait 2>/dev/null) =~ ^(running|degraded)$ ]] && break; sleep 0.2
done

# ------------------------------------------------------------------ 4. duet.target at boot
say "4a. duet.target, enabled by duet install, started both services at boot"
wait_active duet.target 30; wait_active duet-follower 30; wait_active duet-planner 60
sctl list-units 'duet*' --no-pager --plain --no-legend

# ------------------------------------------------------------------ 1. READY gates active
say "1. Type=notify: activating until READY=1, STATUS= in systemctl status"
sctl stop duet-planner duet-follower
T0=$(date +%s)
sctl start --no-block duet-follower
seen=() last=""
for _ in $(seq 1 300); do
    s=$(state duet-follower); [[ $last == "$s" ]] || seen+=("$s"); last=$s
    [[ $s == active/running ]] && break; sleep 0.02
done
echo "states seen: ${seen[*]}"
[[ ${seen[0]} == activating/start && ${seen[-1]} == active/running ]] \
    || die "expected activating/start ... active/running, saw ${seen[*]}"
exec_us=$(prop duet-follower ExecMainStartTimestampMonotonic)
active_us=$(prop duet-follower ActiveEnterTimestampMonotonic)
echo "exec -> active: $(((active_us - exec_us) / 1000)) ms (the follower's imports, bus open, first read)"
journal=$(journal_since "$T0" -u duet-follower)
echo "$journal" | grep -E 'follower ready|Started duet-follower'
ready_line=$(echo "$journal" | grep -n 'follower ready' | head -n1 | cut -d: -f1)
started_line=$(echo "$journal" | grep -n 'Started duet-follower' | head -n1 | cut -d: -f1)
[[ -n $ready_line && -n $started_line ]] || die "no ready/started lines in the journal"
sleep 1
sctl status duet-follower --no-pager -l | sed -n '1,9p'
[[ $(prop duet-follower StatusText) =~ ^(HOLD|TRACK|FAULT).*at\ 500\ Hz ]] \
    || die "StatusText: $(prop duet-follower StatusText)"
echo "the realtime settings systemd applied (the container lacks CAP_SYS_RESOURCE for rlimits):"
pid=$(prop duet-follower MainPID)
"${C[@]}" chrt -p "$pid" | tr '\n' ' '; echo
"${C[@]}" grep -E 'Max (locked memory|realtime priority)' "/proc/$pid/limits"

say "1b. negative control: motors that don't answer -> never active"
sctl stop duet-follower
kill -STOP -- "-$SIM_PGID"
T1=$(date +%s)
sctl start --no-block duet-follower
seen=() last=""
for _ in $(seq 1 40); do
    s=$(state duet-follower); [[ $last == "$s" ]] || seen+=("$s"); last=$s; sleep 0.1
done
kill -CONT -- "-$SIM_PGID"
echo "states seen in 4 s: ${seen[*]}"
for s in "${seen[@]}"; do [[ $s != active/* ]] || die "active without READY=1: ${seen[*]}"; done
journal_since "$T1" -u duet-follower | grep -E 'BusError|Failed with result|restart counter' | head -4
sctl reset-failed duet-follower   # also clears the start rate limit the failures used up
sctl start duet-follower duet-planner
wait_active duet-follower 30; wait_active duet-planner 60

# ------------------------------------------------------------------ 2. watchdog
say "2. WatchdogSec=2s: a SIGSTOPped follower is killed and restarted"
pid=$(prop duet-follower MainPID); n=$(prop duet-follower NRestarts)
T2=$(date +%s)
sctl kill --signal=SIGSTOP --kill-who=main duet-follower
for _ in $(seq 1 150); do
    [[ $(prop duet-follower NRestarts) -gt $n && $(prop duet-follower ActiveState) == active ]] && break
    sleep 0.1
done
journal=$(journal_since "$T2" -u duet-follower)
echo "$journal" | grep -E 'SIGSTOP|Watchdog|SIGABRT|exited|Failed with result|restart counter|Started'
echo "$journal" | grep -q 'Watchdog timeout (limit 2s)' || die "no watchdog timeout"
echo "$journal" | grep -q "Failed with result 'watchdog'" || die "not failed by the watchdog"
new=$(prop duet-follower MainPID)
[[ $(prop duet-follower ActiveState) == active && $new != "$pid" ]] \
    || die "follower not restarted: pid $pid -> $new, $(state duet-follower)"
echo "follower pid $pid -> $new, NRestarts $n -> $(prop duet-follower NRestarts)"

# ------------------------------------------------------------------ 3. planner alone
say "3. the planner restarts on its own; the follower stays active"
fpid=$(prop duet-follower MainPID); fn=$(prop duet-follower NRestarts)
ppid=$(prop duet-planner MainPID); pn=$(prop duet-planner NRestarts)
T3=$(date +%s)
sctl kill --signal=SIGKILL --kill-who=main duet-planner
for _ in $(seq 1 200); do
    [[ $(prop duet-follower ActiveState) == active ]] || die "follower left active: $(state duet-follower)"
    [[ $(prop duet-planner NRestarts) -gt $pn && $(prop duet-planner ActiveState) == active ]] && break
    sleep 0.1
done
journal_since "$T3" -u duet-planner | grep -E 'SIGKILL|killed|Failed with result|restart counter|Started'
[[ $(prop duet-planner ActiveState) == active && $(prop duet-planner MainPID) != "$ppid" ]] \
    || die "planner not restarted: $(state duet-planner)"
sctl restart duet-planner
[[ $(prop duet-follower MainPID) == "$fpid" && $(prop duet-follower NRestarts) == "$fn" ]] \
    || die "the follower restarted with the planner"
echo "planner pid $ppid -> $(prop duet-planner MainPID) (crash, then systemctl restart);" \
    "follower pid $fpid unchanged, NRestarts $fn, status: $(prop duet-follower StatusText)"

# ------------------------------------------------------------------ 4. the target
say "4b. systemctl stop / start duet.target"
sctl stop duet.target
# `systemctl stop` waits for the target's own job only: the services stop after it returns
for _ in $(seq 1 100); do
    [[ $(prop duet-follower ActiveState) == inactive && $(prop duet-planner ActiveState) == inactive ]] \
        && break; sleep 0.1; done
echo "after stop: follower $(state duet-follower), planner $(state duet-planner)"
[[ $(prop duet-follower ActiveState) == inactive && $(prop duet-planner ActiveState) == inactive ]] \
    || die "stopping duet.target left a service running"
sctl start duet.target
echo "after start: target $(state duet.target), follower $(state duet-follower)," \
    "planner $(state duet-planner)"
[[ $(prop duet-follower ActiveState) == active && $(prop duet-planner ActiveState) == active ]] \
    || die "starting duet.target did not start both"

say "relaxed for the container (everything else as shipped)"
cat "$UNITS"/duet-follower.service.d/zz-container.conf
echo
echo "ALL CHECKS PASSED"
