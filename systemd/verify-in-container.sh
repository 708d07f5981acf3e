#!/usr/bin/env bash
# Verify duet's install and units under a real systemd: boot Debian bookworm in systemd-nspawn,
# install duet into it the way the README tells a technician (a non-editable bootstrap venv,
# then `sudo duet install` on /), drive the follower against the sim on the host, and check,
# with assertions on what the commands, systemctl and the journal report:
#   0. `duet install` on / when udevadm fails (no udevd in a container): one line naming the
#      step and its fix, exit 1, nothing left installed; rerun with --no-udev-reload: duet on
#      PATH (/usr/local/bin/duet), units enabled, `duet doctor` sees the services;
#   1. duet-follower.service (Type=notify) is active only after READY=1, its STATUS= text
#      shows in `systemctl status`, and it never becomes active when the motors don't answer;
#   2. the watchdog (WatchdogSec=2s) kills a stalled (SIGSTOPped) follower and it restarts;
#   3. duet-planner.service restarts on its own while the follower stays active, same PID;
#   4. duet.target starts both at boot, and stop/start of the target stops/starts both;
#   5. after the follower hits its start limit, `systemctl restart duet.target` leaves it
#      failed, and the command duet prints (reset-failed + restart) brings it back;
#   6. `duet config set follower.realtime.cpu=0` re-renders the drop-in and reloads systemd;
#   7. `duet uninstall` stops and removes everything but /etc/duet and the recordings, and
#      the `rm` it prints (duet is gone by then) removes those too;
# and, with the recorder disabled (the default), as the technician and an operator meet them:
#   8. the service users: planner and recorder as duet-planner / duet-recorder (group duet),
#      /run/duet 1770 root:duet from tmpfiles.d;
#   9. `duet doctor` as an operator (a user in the group duet, not root) passes;
#  10. README.md's "On the robot" block, line by line as written (an operator's lines as that
#      operator, `sudo` lines as root), after a second bundle is activated;
#  11. every printed restart command (install, config set, bundle activate / rollback,
#      doctor) run as printed: exit 0, the services active after it;
#  12. a reboot (the container powered off, /run emptied, booted again) with an ESTOP latched:
#      the follower comes back latched, and the operator's `duet reset` clears it;
#  13. the offline install: the bootstrap `duet pack` prints, run as printed in the container
#      without network, then `duet uninstall --purge` in one step.
# Needs root, a Python venv with duet's dependencies and the sim's (VENV, default .venv in the
# checkout), debootstrap and systemd-nspawn (apt-get install debootstrap systemd-container).
# The first run fetches Debian (~3 min); later runs reuse it. The pip installs inside the
# container use the host's package index folders and pip config. Not part of the test suite.
#
#   sudo systemd/verify-in-container.sh            # WORK=/tmp/duet-nspawn by default
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/duet-nspawn}
ROOTFS=$WORK/rootfs
RUN=$WORK/run          # the host sim's run dir = /run/duet in the container (camera ipc)
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
UNITS=$ROOTFS/etc/systemd/system

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, nspawn)"
[[ -x $PY ]] || die "no virtualenv at $VENV (make venv, or VENV=...)"
for tool in debootstrap systemd-nspawn nsenter; do
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
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,udev,python3-venv \
        bookworm "$ROOTFS" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed: $WORK/debootstrap.log"
fi
# a clean robot: nothing of an earlier run
rm -rf "$UNITS"/duet* "$UNITS"/multi-user.target.wants/duet.target "$ROOTFS"/etc/duet \
    "$ROOTFS"/var/lib/duet "$ROOTFS"/opt/duet "$ROOTFS"/usr/local/bin/duet \
    "$ROOTFS"/etc/udev/rules.d/99-duet-* "$ROOTFS"/etc/sysusers.d/duet.conf \
    "$ROOTFS"/etc/tmpfiles.d/duet.conf "$ROOTFS"/root/duet "$ROOTFS"/tmp/duet-bootstrap \
    "$ROOTFS"/root/bundle2 "$ROOTFS"/root/offline "$ROOTFS"/home/op \
    "$RUN" "$WORK/bundle"
mkdir -p "$RUN"

say "the checkout, a bundle and a robot config, copied into the container"
mkdir -p "$ROOTFS/root/duet"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) \
    | tar -xf - -C "$ROOTFS/root/duet"
PYTHONPATH=$REPO "$PY" -c "import sys; sys.path.insert(0, '$REPO/tests'); from pathlib import Path
from onnx_bundle import make_bundle; make_bundle(Path('$ROOTFS/root/bundle'))"
"$PY" - "$REPO/configs/sim.yaml" "$ROOTFS/root/robot.yaml" <<'EOF'
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["bus"]["device"] = "/dev/ttyDUET0"   # the udev name; bound to the sim's pty below
del cfg["sim"]                           # a real robot's config: duet install refuses a sim one
cfg["bundle"]["path"] = "/var/lib/duet/bundles/current"
# the motors are the host's sim, a process on a shared host: a 5 ms reply deadline latches a
# FAULT whenever the host is loaded (a real servo answers in well under a millisecond)
cfg["bus"]["timeout_ms"] = 50.0
# and the follower shares 2 loaded cores with the sim and the builds: late ticks are the host's,
# so neither a deadline storm nor the health thresholds may call this robot unhealthy
cfg["follower"].setdefault("deadline_storm", {})["misses"] = 400
cfg["follower"]["health"] = {"min_rate_ratio": 0.5, "max_miss_ratio": 0.5}
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
EOF
# the host's package index folders are bound in below; its pip config is copied in
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt \
         /root/.config/pip/pip.conf; do
    [[ -f $f ]] && install -D -m 0644 "$f" "$ROOTFS$f"
done
BINDS=()
for d in /opt/pypi /opt/pypi-more /opt/wheels /etc/ssl/certs; do
    [[ -d $d ]] && BINDS+=(--bind-ro="$d")
done

# ------------------------------------------------------------------ the sim on the host
say "duet sim on the host (run dir $RUN)"
# umask 000: the sim's camera socket must be connectable by the container's duet user.
(umask 000; cd "$REPO"; MUJOCO_GL=egl PYTHONPATH=$REPO exec setsid "$PY" -m runtime.cli sim \
    --config "$REPO/configs/sim.yaml" --set bus.device=sim --run-dir "$RUN" \
    >"$WORK/sim.out" 2>"$WORK/sim.err") &
SIM_PGID=$!
for _ in $(seq 1 150); do [[ -s $WORK/sim.out ]] && break; sleep 0.2; done
PTY=$(readlink -f "$(head -n1 "$WORK/sim.out")")
[[ $PTY == /dev/pts/* ]] || die "sim gave no pty: $(cat "$WORK/sim.out" "$WORK/sim.err")"
# as udev sets a USB serial adapter: root:dialout 0660 (the follower runs as duet, in dialout)
chgrp dialout "$PTY" && chmod 0660 "$PTY"
echo "motor bus: $PTY -> /dev/ttyDUET0 in the container"

# ------------------------------------------------------------------ boot
say "boot the container"
boot() {
    systemd-nspawn -D "$ROOTFS" --boot --register=no --keep-unit --console=passive \
        "${BINDS[@]}" --bind="$RUN":/run/duet --bind="$PTY":/dev/ttyDUET0 \
        >>"$WORK/nspawn.log" 2>&1 &
    NSPAWN_PID=$!
    INIT=""
    for _ in $(seq 1 100); do INIT=$(pgrep -P "$NSPAWN_PID" -x systemd || true)
        [[ -n $INIT ]] && break; sleep 0.2; done
    [[ -n $INIT ]] || die "container did not boot: $(cat "$WORK/nspawn.log")"
    # a root shell on the robot: the container's binaries, a clean environment
    C=(nsenter -t "$INIT" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
       HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180)
    # until PID 1 answers on its bus and boot is done (degraded is fine here)
    for _ in $(seq 1 150); do
        [[ $(sctl is-system-running --wait 2>/dev/null) =~ ^(running|degraded)$ ]] && break
        sleep 0.2
    done
}
on_robot() { "${C[@]}" sh -c "cd /root/duet && $1"; }
sctl() { "${C[@]}" systemctl "$@"; }
prop() { sctl show -p "$2" --value "$1"; }
state() { sctl show -p ActiveState -p SubState --value "$1" | paste -sd/; }  # one read: no race
wait_active() {  # unit, seconds
    for _ in $(seq 1 $(($2 * 10))); do [[ $(prop "$1" ActiveState) == active ]] && return 0
        sleep 0.1; done
    sctl status "$1" --no-pager -l | tail -20; die "$1 not active within $2 s"
}
journal_since() { "${C[@]}" journalctl -o short-monotonic --no-pager --since "@$1" "${@:2}"; }
OP=(runuser -u op --)   # an operator: in the group duet, not root
as_op() { "${C[@]}" "${OP[@]}" sh -c "cd /home/op && $1"; }
# a command duet printed for the reader, run as printed: sudo lines as root, others as `op`
run_printed() {
    local line=$1
    echo "\$ $line"
    if [[ $line == sudo\ * ]]; then "${C[@]}" sh -c "${line//sudo /}"; else as_op "$line"; fi
}
both_active() { wait_active duet-follower 60; wait_active duet-planner 90; }
: >"$WORK/nspawn.log"
boot

# ------------------------------------------------------------------ 0. install on /
say "0a. README: a non-editable bootstrap venv in the checkout"
on_robot "python3 -m venv /tmp/duet-bootstrap && /tmp/duet-bootstrap/bin/pip install -q ." \
    || die "bootstrap pip install failed"
on_robot "/tmp/duet-bootstrap/bin/duet --version"

say "0b. duet install on / with a udevadm that fails (no udevd in a container)"
set +e
out=$(on_robot "/tmp/duet-bootstrap/bin/duet install --config /root/robot.yaml \
    --bundle /root/bundle" 2>&1)
rc=$?
set -e
echo "$out" | grep -v '^+ \|^  \|^Requirement\|^Collecting\|^Using\|^Processing\|^Installing\|^Successfully\|^Building\|^Created\|^Looking\|^Obtaining\|^Attempting\|^  ' | tail -8
[[ $rc == 1 ]] || die "expected exit 1 from the failing install, got $rc"
last=$(echo "$out" | tail -n1)
[[ $last =~ ^duet\ install:\ \`udevadm\ control\ --reload\`\ failed\ \(exit\ [0-9]+.*\)\;\ fix:.*--no-udev-reload\;\ rolled\ back.*nothing\ enabled$ ]] \
    || die "the failure is not one line naming udevadm and its fix: $last"
for p in /etc/systemd/system/duet.target /etc/systemd/system/duet-follower.service \
         /etc/systemd/system/duet-follower.service.d /usr/local/bin/duet /opt/duet /etc/duet \
         /etc/udev/rules.d/99-duet-serial.rules /var/lib/duet/bundles/current; do
    [[ ! -e $ROOTFS$p && ! -L $ROOTFS$p ]] || die "half-installed: $p was left behind"
done
[[ $(prop duet-follower.service LoadState) == not-found ]] || die "systemd still knows duet-follower"
echo "rolled back: no unit, drop-in, rule, config, bundle, venv or /usr/local/bin/duet left"

say "0c. rerun as the fix says (--no-udev-reload): installed, duet on PATH"
on_robot "/tmp/duet-bootstrap/bin/duet install --config /root/robot.yaml --bundle /root/bundle \
    --no-udev-reload" 2>&1 | grep -v '^  \|^Requirement\|^Collecting\|^Using\|^Processing\|^Installing\|^Successfully\|^Building\|^Created\|^Looking' | tail -6
[[ $("${C[@]}" sh -c 'command -v duet') == /usr/local/bin/duet ]] || die "duet not on PATH"
"${C[@]}" duet --version
"${C[@]}" ls -l /usr/local/bin/duet
[[ $(prop duet.target UnitFileState) == enabled ]] || die "duet.target not enabled"
for u in duet-follower duet-planner; do
    [[ $(prop "$u" UnitFileState) == enabled ]] || die "$u not enabled"
done
[[ $(prop duet-recorder UnitFileState) != enabled ]] || die "the recorder is enabled (default: off)"
echo "enabled: duet.target duet-follower duet-planner; duet-recorder not (recorder.enabled: false)"
INSTALL_HINT=$(on_robot "/tmp/duet-bootstrap/bin/duet install --config /root/robot.yaml \
    --bundle /root/bundle --no-udev-reload" 2>&1 | grep -o 'sudo systemctl reset-failed.*' | head -n1 || true)
echo "install (re-run) prints: $INSTALL_HINT"
[[ $INSTALL_HINT == *reset-failed* && $INSTALL_HINT != *recorder* ]] \
    || die "install's restart line names the disabled recorder or is missing: $INSTALL_HINT"

say "8. the service users and the run dir"
# (the rootfs is reused: the user may be there from an earlier run)
"${C[@]}" id op >/dev/null 2>&1 || "${C[@]}" useradd -m op
"${C[@]}" usermod -aG duet op
"${C[@]}" sh -c 'mkdir -p /home/op && chown op: /home/op'
for u in duet duet-planner duet-recorder; do
    "${C[@]}" id "$u"
    [[ $("${C[@]}" id -gn "$u") == duet ]] || die "$u's primary group is not duet"
done

# ------------------------------------------------------------------ 4. duet.target
say "4a. systemctl start duet.target starts all services"
sctl start duet.target
both_active
sctl list-units 'duet*' --no-pager --plain --no-legend
"${C[@]}" stat -c '%A %U:%G %n' /run/duet
[[ $("${C[@]}" stat -c '%a %U:%G' /run/duet) == "1770 root:duet" ]] || die "/run/duet is not 1770 root:duet"
for u in duet-follower:duet duet-planner:duet-planner; do
    pid=$(prop "${u%%:*}" MainPID)
    [[ $("${C[@]}" stat -c %U "/proc/$pid") == "${u##*:}" ]] || die "${u%%:*} does not run as ${u##*:}"
    echo "${u%%:*} runs as ${u##*:} (pid $pid)"
done

say "9. duet doctor as an operator (op: in the group duet, not root)"
set +e; doctor=$(as_op "duet doctor" 2>&1); rc=$?; set -e
echo "$doctor"
[[ $rc == 0 ]] || die "duet doctor as an operator exited $rc on a healthy robot"
"${C[@]}" duet status --json >/dev/null && echo "duet status: healthy" \
    || "${C[@]}" duet status || true
"${C[@]}" duet doctor | grep -E '^(ok|WARN|FAIL) +(service|run dir|config|bus device)' || true

# ------------------------------------------------------------------ 1. READY gates active
say "1. Type=notify: activating until READY=1, STATUS= in systemctl status"
sctl stop duet-planner duet-follower
T0=$(date +%s)
sctl start --no-block duet-follower
seen=() last=""
for _ in $(seq 1 600); do
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
journal_since "$T1" -u duet-follower | grep -E 'BusError|not readable|Failed with result|restart counter' | head -4
sctl reset-failed duet-follower   # also clears the start rate limit the failures used up
sctl start duet-follower duet-planner
wait_active duet-follower 30; wait_active duet-planner 90

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
for _ in $(seq 1 300); do
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
# (a follower that stops latched in FAULT/ESTOP exits 3/4: systemd shows it failed, not inactive)
down() { [[ $(prop "$1" ActiveState) =~ ^(inactive|failed)$ ]]; }
for _ in $(seq 1 100); do down duet-follower && down duet-planner && break; sleep 0.1; done
echo "after stop: follower $(state duet-follower), planner $(state duet-planner)"
down duet-follower && down duet-planner || die "stopping duet.target left a service running"
sctl start duet.target
wait_active duet-follower 30; wait_active duet-planner 90
echo "after start: target $(state duet.target), follower $(state duet-follower)," \
    "planner $(state duet-planner)"

# ------------------------------------------------------------------ 5. the restart hint
say "5. start limit hit: the restart hint that really recovers"
kill -STOP -- "-$SIM_PGID"         # the motors stop answering: every start fails
T5=$(date +%s)
sctl restart duet-follower || true
limit() { journal_since "$T5" -u duet-follower | grep -q 'Start request repeated too quickly'; }
for _ in $(seq 1 120); do limit && break; sleep 0.5; done
kill -CONT -- "-$SIM_PGID"         # the motors are back
journal_since "$T5" -u duet-follower | grep -E 'restart counter|repeated too quickly' | tail -3
echo "follower: $(state duet-follower), result $(prop duet-follower Result)," \
    "restarts $(prop duet-follower NRestarts)"
limit || die "the start limit was not hit"
sctl restart duet.target || true
sleep 3
echo "after 'systemctl restart duet.target' alone: follower $(state duet-follower)"
[[ $(prop duet-follower ActiveState) != active ]] \
    || die "expected the follower to stay failed after a plain restart"
doctor=$("${C[@]}" duet doctor || true)   # exit 1: a check failed, as it should
echo "$doctor" | grep -A1 'duet-follower.service: failed'
hint=$(echo "$doctor" | grep -A1 'duet-follower.service: failed' \
    | grep -o 'sudo systemctl reset-failed.*' | head -n1 || true)
echo "duet doctor says: $hint"
[[ $hint == *reset-failed*restart* ]] || die "no reset-failed hint from duet doctor"
[[ $hint != *recorder* ]] || die "the hint names the disabled recorder"
run_printed "$hint" || die "the printed restart failed"
wait_active duet-follower 30; wait_active duet-planner 90
echo "after the hint: follower $(state duet-follower), planner $(state duet-planner)"

# ------------------------------------------------------------------ 6. drop-ins follow the config
say "6. duet config set re-renders the drop-in and reloads systemd"
out=$("${C[@]}" duet config set follower.realtime.cpu=0)
echo "$out"
hint=$(echo "$out" | grep -o 'sudo systemctl reset-failed.*' | head -n1)
[[ -n $hint && $hint != *recorder* ]] || die "config set printed no restart, or names the recorder"
run_printed "$hint" || die "config set's printed restart failed"
both_active
"${C[@]}" cat /etc/systemd/system/duet-follower.service.d/realtime.conf | grep CPUAffinity
[[ $(prop duet-follower NeedDaemonReload) == no ]] || die "systemd was not reloaded"
[[ $(sctl cat duet-follower | grep -c '^CPUAffinity=0$') -ge 1 ]] || die "drop-in not in effect"
"${C[@]}" tail -n1 /var/lib/duet/config-changes.log

# ------------------------------------------------------------------ 10, 11. README, bundles
say "10/11. a second bundle; README.md's robot block line by line; the printed restarts"
PYTHONPATH=$REPO "$PY" -c "import sys; sys.path.insert(0, '$REPO/tests'); from pathlib import Path
from onnx_bundle import make_bundle; make_bundle(Path('$ROOTFS/root/bundle2'), gain=0.2)"
out=$("${C[@]}" duet bundle add /root/bundle2); echo "$out"
version=$(echo "$out" | grep -o 'duet bundle activate [^ ]*' | awk '{print $4}')
[[ -n $version ]] || die "bundle add printed no version to activate"
out=$("${C[@]}" duet bundle activate "$version"); echo "$out"
hint=$(echo "$out" | grep -o 'sudo systemctl reset-failed.*' | head -n1)
[[ -n $hint && $hint != *recorder* ]] || die "bundle activate printed no restart, or names the recorder"
run_printed "$hint" || die "bundle activate's printed restart failed"
both_active
# the block under "## On the robot" in README.md, as written
mapfile -t lines < <(awk '/^## On the robot/{f=1} f&&/^```bash/{c=1; next} c&&/^```/{exit} c' \
    "$REPO/README.md")
[[ ${#lines[@]} -ge 5 ]] || die "no command block under '## On the robot' in README.md"
for raw in "${lines[@]}"; do
    line=${raw%%#*}; line=${line%"${line##*[![:space:]]}"}
    [[ -n $line ]] || continue
    set +e
    if [[ $line == *" -f" ]]; then   # follows for ever: 3 s of it
        run_printed "${line/journalctl/timeout 3 journalctl}" >"$WORK/line.out" 2>&1; rc=$?
        [[ $rc == 124 ]] && rc=0
    else
        run_printed "$line" >"$WORK/line.out" 2>&1; rc=$?
    fi
    set -e
    tail -n 6 "$WORK/line.out"
    [[ $rc == 0 ]] || die "README line failed (exit $rc): $line"
    if [[ $line == *"bundle rollback"* ]]; then
        hint=$(grep -o 'sudo systemctl reset-failed.*' "$WORK/line.out" | head -n1)
        [[ -n $hint && $hint != *recorder* ]] || die "rollback printed no restart"
        run_printed "$hint" || die "bundle rollback's printed restart failed"
        both_active
    fi
    if [[ $line == *"duet estop"* ]]; then
        grep -q 'Resume with: duet reset' "$WORK/line.out" || die "estop's resume line changed"
    fi
done
echo "README.md's robot block: ${#lines[@]} lines ran as written"

# ------------------------------------------------------------------ 12. reboot, latched
say "12. a reboot with an ESTOP latched: the follower comes back latched"
as_op "duet estop" | tail -n1
[[ -f $ROOTFS/var/lib/duet/state/follower.latched ]] || die "no latch under /var/lib/duet/state"
cat "$ROOTFS/var/lib/duet/state/follower.latched"; echo
nsenter -t "$INIT" -a systemctl poweroff >/dev/null 2>&1 || true
for _ in $(seq 1 150); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
kill -0 "$NSPAWN_PID" 2>/dev/null && die "the container did not power off"
# /run is a tmpfs on a robot: a reboot empties it of duet's files. The host sim's own (its
# camera socket, its control socket, the servos' pty link) stand for hardware and stay.
find "$RUN" -mindepth 1 -maxdepth 1 ! -name sim ! -name sim-control ! -name ttyDUET0 \
    -exec rm -rf {} +
boot
both_active
set +e; status=$(as_op "duet status" 2>&1); rc=$?; set -e
echo "$status" | head -n 8
[[ $rc != 0 ]] && echo "$status" | grep -q ESTOP && echo "$status" | grep -q 'latched before restart' \
    || die "the follower did not come back latched after the reboot"
as_op "duet reset" || die "the operator's duet reset out of ESTOP failed"
for _ in $(seq 1 60); do as_op "duet status --json" >/dev/null 2>&1 && break; sleep 1; done
as_op "duet status" || die "not healthy within 60 s of the reset"
echo "after the reboot: ESTOP latched before restart; the operator's duet reset: HOLD"

# ------------------------------------------------------------------ 7. uninstall
say "7. duet uninstall keeps the config and recordings; --purge removes them"
"${C[@]}" mkdir -p /var/lib/duet/recordings/episodes
"${C[@]}" touch /var/lib/duet/recordings/episodes/kept.mcap
out=$("${C[@]}" duet uninstall); echo "$out"
for p in /etc/systemd/system/duet-follower.service /usr/local/bin/duet /opt/duet \
         /var/lib/duet/bundles; do
    [[ ! -e $ROOTFS$p && ! -L $ROOTFS$p ]] || die "uninstall left $p"
done
[[ -f $ROOTFS/etc/duet/site.yaml && -f $ROOTFS/var/lib/duet/recordings/episodes/kept.mcap ]] \
    || die "uninstall removed the config or the recordings"
[[ $(prop duet-follower.service LoadState) == not-found ]] || die "systemd still has the unit"
[[ $(prop duet-follower.service ActiveState) == inactive ]] || die "follower still running"
"${C[@]}" sh -c 'command -v duet' && die "duet still on PATH after uninstall"
purge=$(echo "$out" | grep -o 'sudo rm -rf .*')
[[ -n $purge ]] || die "uninstall printed no way to remove what it kept"
run_printed "$purge"
[[ ! -e $ROOTFS/etc/duet && ! -e $ROOTFS/var/lib/duet ]] || die "the printed purge left data"

# ------------------------------------------------------------------ 13. offline
say "13. the offline install: duet pack on the host, its printed bootstrap run without network"
(cd "$REPO" && PYTHONPATH=$REPO "$PY" -m runtime.cli pack --platform x86_64 --python 3.11     --config "$ROOTFS/root/robot.yaml" --bundle "$ROOTFS/root/bundle"     --out "$ROOTFS/root/offline/duet-x86_64.tar.gz" >"$WORK/pack.out" 2>"$WORK/pack.err")     || die "duet pack failed: $(tail -5 "$WORK/pack.err")"
cat "$WORK/pack.out"
mapfile -t steps < <(sed -n '/^on the robot/,$p' "$WORK/pack.out" | tail -n +2 | sed 's/^  //')
[[ ${#steps[@]} == 3 ]] || die "duet pack printed no bootstrap"
rm -rf "$ROOTFS"/tmp/duet-bootstrap "$ROOTFS"/tmp/duet-*-x86_64*
for line in "${steps[@]}"; do
    line=${line%% \[--usb-serial*}
    [[ $line == *"duet install --offline"* ]] && line+=" --no-udev-reload"   # no udevd here
    echo "\$ $line   (no network)"
    out=$("${C[@]}" unshare --net sh -c "cd /root/offline && ${line//sudo /}" 2>&1) \
        || die "offline step failed: $line: $(echo "$out" | tail -n 8)"
    echo "$out" | tail -n 4
done
"${C[@]}" duet --version
sctl start duet.target
both_active
echo "offline install: active; now uninstall --purge in one step"
"${C[@]}" duet uninstall --purge
[[ ! -e $ROOTFS/etc/duet && ! -e $ROOTFS/var/lib/duet && ! -e $ROOTFS/usr/local/bin/duet ]]     || die "--purge left data"

say "relaxed for the container: nothing in the units; udev reload skipped (no udevd)"
echo
echo "ALL CHECKS PASSED"
