#!/usr/bin/env bash
# Verify duet on arm64 for real, under emulation: build a Debian bookworm arm64 root with
# debootstrap, run it with qemu-user (binfmt_misc), and inside it
#   1. install duet's wheel (built here) with the robot extras `[sim]` from wheels only
#      (`pip install --only-binary=:all:`, aarch64 wheels from the package index);
#   2. import the robot code and check that torch is neither imported nor installed;
#   3. rerun the reference bundle's parity set (`duet export check`, ONNX Runtime CPU);
#   4. run the sim + follower + planner stack (`duet run`) for 10 s with the reference bundle,
#      at rates emulation keeps up with, and check its summary;
# then print what passed. It proves installation and function on aarch64, not timing.
# Needs root; installs debootstrap, qemu-user-static and binfmt-support when missing. The
# first run fetches and unpacks Debian and the wheels (~30-60 min on 2 busy cores); later
# runs reuse the root and the venv under $CACHE (~10 min). Not part of the test suite.
#
#   make verify-aarch64            # or: systemd/verify-aarch64.sh; AARCH64_CACHE=runs/aarch64 by default
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$(realpath -m "${AARCH64_CACHE:-$REPO/runs/aarch64}")
ROOTFS=$CACHE/rootfs
SUITE=bookworm
VENV=/opt/duet/venv            # inside the root, where `duet install` puts it on the robot
SRC=/opt/duet/src              # the repo's configs and bundles only: the code is the wheel's
DURATION=10
# Debian packages in the root: Python, and Mesa's EGL (llvmpipe) for the sim's camera.
DEBS=(python3 python3-venv ca-certificates libegl1 libegl-mesa0 libgl1 libopengl0 libgl1-mesa-dri)
# What emulation cannot keep: rates and real-time settings relaxed for this run only.
RELAXED=(
    follower.hz=50                               # the robot: 500 Hz; 20 ms ticks keep the follower's look-ahead grid
    follower.spin_us=0                           # no busy-wait before each deadline
    follower.realtime.sched_fifo_priority=0      # no SCHED_FIFO
    follower.realtime.mlockall=false
    follower.realtime.cpu=null                   # no reserved core
    follower.deadline_storm.misses=100000        # deadline-miss storms never fault
    follower.deadline_storm.window_ticks=100000
    follower.plan_timeout_ms=10000               # plans may take seconds to arrive
    bus.timeout_ms=100                           # the emulated servos answer slowly
    planner.hz=0.25                              # the robot: 5 Hz; inference takes ~3 s here
    planner.cameras.scene.stale_ms=10000
    sim.rt_priority=0
    sim.physics_hz=200                           # 1 kHz by default
    sim.camera_hz=0.25                           # 10 Hz by default; a frame takes 1-4 s here
    sim.episode_timeout_s=4                      # so that episodes end within the run
)

source "$REPO/systemd/host-access.sh"

T0=$SECONDS
say() { printf '\n=== [%4ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
RESULTS=()
check() {  # name, detail, condition (a command)
    local name=$1 detail=$2; shift 2
    if "$@"; then RESULTS+=("PASS  $name: $detail"); else RESULTS+=("FAIL  $name: $detail"); fi
}

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot, mounts)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || die "another verify-aarch64 holds $CACHE/.lock"

# ------------------------------------------------------------------ host tools, binfmt
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if ((${#need[@]})); then
    say "apt-get install ${need[*]} (host)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
BINFMT=/proc/sys/fs/binfmt_misc
mountpoint -q "$BINFMT" || mount -t binfmt_misc binfmt_misc "$BINFMT"
[[ -e $BINFMT/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64 \
    || update-binfmts --import qemu-aarch64
# F: the kernel holds the interpreter open, so it runs inside a chroot that lacks it
grep -q '^flags:.*F' "$BINFMT/qemu-aarch64" \
    || die "binfmt qemu-aarch64 lacks the F flag: $(cat "$BINFMT/qemu-aarch64")"

# ------------------------------------------------------------------ mounts, cleanup
MOUNTED=()
cleanup() {
    local p pids=()
    for p in /proc/[0-9]*; do  # whatever this run left running in the root
        [[ $(readlink "$p/root" 2>/dev/null) == "$ROOTFS" ]] && pids+=("${p#/proc/}")
    done
    ((${#pids[@]})) && kill -KILL "${pids[@]}" 2>/dev/null
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTED[i]}" 2>/dev/null || umount -Rl "${MOUNTED[i]}" || true
    done
    return 0
}
trap cleanup EXIT
unmount_stale() {  # left by a run that was killed before its trap ran
    local m
    for m in dev proc; do
        if mountpoint -q "$ROOTFS/$m"; then umount -R "$ROOTFS/$m" || umount -Rl "$ROOTFS/$m"; fi
        ! mountpoint -q "$ROOTFS/$m" || die "$ROOTFS/$m is still mounted"
    done
}
# No /sys in the root: qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo, and ONNX
# Runtime's cpuinfo then crashes (SIGSEGV) when /sys lists the CPUs; without /sys it warns and
# falls back. The robot code reads nothing there (only `duet doctor`, not run here).
mount_root() {
    unmount_stale
    mount -t proc proc "$ROOTFS/proc" && MOUNTED+=("$ROOTFS/proc")
    mount --rbind /dev "$ROOTFS/dev" && mount --make-rslave "$ROOTFS/dev" && MOUNTED+=("$ROOTFS/dev")
}
# A clean environment in the root (the host's PIP_* name host paths); nice: others' timing
# tests share this machine.
ROOT_ENV=("PATH=$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8
    DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [[ -n ${!v:-} ]] && ROOT_ENV+=("$v=${!v}")
done
in_root() { nice -n 19 chroot "$ROOTFS" /usr/bin/env -i "${ROOT_ENV[@]}" "$@"; }
# ONNX Runtime's cpuinfo cannot read an x86 /proc/cpuinfo as ARM's and says so on every
# session: kept in the logs, left out of what is printed.
unnoise() { sed -E '/^(Error in cpuinfo|onnxruntime (cpuid_info )?warning)/d'; }

# ------------------------------------------------------------------ the arm64 root
MIRROR=$(host_debian_mirror)
if [[ ! -e $ROOTFS/.duet-debootstrap-ok ]]; then
    [[ -d $ROOTFS ]] && unmount_stale
    rm -rf --one-file-system "$ROOTFS"
    say "debootstrap --arch=arm64 $SUITE from $MIRROR (slow: the second stage runs under qemu)"
    nice -n 19 debootstrap --arch=arm64 --variant=minbase --include="$(IFS=,; echo "${DEBS[*]}")" \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed: $CACHE/debootstrap.log"
    touch "$ROOTFS/.duet-debootstrap-ok"
fi

# ------------------------------------------------------------------ duet's wheel
# built from the files git sees (not runs/, which holds this root), before anything is mounted
say "duet's wheel, built here (pip wheel --no-deps)"
rm -rf "$CACHE/wheel" "$CACHE/src" && mkdir -p "$CACHE/wheel" "$CACHE/src"
git -C "$REPO" ls-files -z -co --exclude-standard \
    | tar -C "$REPO" --null --ignore-failed-read -T - -cf - | tar -C "$CACHE/src" -xf -
(cd "$CACHE/src" && nice -n 19 python3 -m pip wheel -q --no-deps -w "$CACHE/wheel" .) \
    || die "pip wheel failed"
WHL=$(basename "$(ls "$CACHE"/wheel/*.whl)")
echo "$WHL"

say "the root's package access (host settings copied in)"
root_copy_host_access "$ROOTFS"
mount_root
[[ $(in_root uname -m) == aarch64 ]] || die "the root does not run as aarch64: $(in_root uname -m)"
missing=()
for d in "${DEBS[@]}"; do
    # shellcheck disable=SC2016  # dpkg-query's own ${Status}
    in_root dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'ok installed' || missing+=("$d")
done
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]} (arm64, in the root)"
    in_root apt-get update -qq
    in_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$CACHE/apt.log" 2>&1 \
        || die "apt-get install in the root failed: $CACHE/apt.log"
fi
PYVER=$(in_root python3 -c 'import platform; print(platform.python_version())')
echo "Debian $(cat "$ROOTFS/etc/debian_version") arm64, Python $PYVER, $(in_root uname -m) via" \
    "$(qemu-aarch64-static --version | head -n1)"

# ------------------------------------------------------------------ 1. install from wheels
rm -rf "$ROOTFS/tmp/wheel" && cp -r "$CACHE/wheel" "$ROOTFS/tmp/wheel"

# the venv is reused; pip runs again only when the source changed (pip under qemu: minutes)
SRC_HASH=$(cd "$CACHE/src" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
SRC_HASH=${SRC_HASH:0:16}
STAMP=$ROOTFS$VENV/.duet-source
install_ok=true
if [[ -x $ROOTFS$VENV/bin/python && $(cat "$STAMP" 2>/dev/null) == "$SRC_HASH" ]]; then
    say "$VENV holds the wheel of this source ($SRC_HASH) from an earlier run: pip check"
    how="installed by an earlier run from this source, pip check ok"
    in_root pip check >"$CACHE/pip.log" 2>&1 || install_ok=false
else
    say "pip install --only-binary=:all: '${WHL}[sim]' into $VENV (arm64)"
    how="pip install --only-binary=:all: '${WHL}[sim]'"
    rm -f "$STAMP"
    [[ -x $ROOTFS$VENV/bin/python ]] || in_root python3 -m venv "$VENV"
    { in_root pip install --only-binary=:all: "/tmp/wheel/${WHL}[sim]" \
        && in_root pip install --only-binary=:all: --no-deps --force-reinstall "/tmp/wheel/$WHL"; } \
        >"$CACHE/pip.log" 2>&1 && echo "$SRC_HASH" >"$STAMP" || install_ok=false
fi
tail -n 3 "$CACHE/pip.log"
# every installed distribution and the wheel tag it came with (an sdist build would say so)
in_root python - <<'EOF' | tee "$CACHE/wheels.txt"
import importlib.metadata as md
rows = []
for d in md.distributions():
    tags = [ln.split(":", 1)[1].strip() for ln in (d.read_text("WHEEL") or "").splitlines()
            if ln.startswith("Tag:")]
    rows.append(f"{d.metadata['Name']}=={d.version} [{', '.join(tags) or 'no WHEEL record'}]")
print("\n".join(sorted(rows, key=str.lower)))
EOF
n_whl=$(wc -l <"$CACHE/wheels.txt")
n_arm=$(grep -c 'aarch64' "$CACHE/wheels.txt" || true)
n_sdist=$(grep -c 'no WHEEL record' "$CACHE/wheels.txt" || true)
[[ $n_sdist == 0 ]] || install_ok=false
check "install" "$how: $n_whl distributions, $n_sdist not from a wheel, $n_arm aarch64 builds" \
    "$install_ok"
$install_ok || { printf '%s\n' "${RESULTS[@]}"; die "install failed: $CACHE/pip.log"; }

# ------------------------------------------------------------------ 2. imports, no torch
say "import the robot code; torch neither imported nor installed"
echo "(ONNX Runtime's warnings that it cannot identify the emulated CPU: in the logs only)"
imports=$(in_root python - <<'EOF' 2>&1
import importlib.util, platform, sys
import onnxruntime
import runtime.cli, runtime.follower.process, runtime.planner.process, runtime.stack.supervisor  # noqa: F401
import drivers, export.check, sim.server  # noqa: F401
import mujoco
assert platform.machine() == "aarch64", platform.machine()
assert "site-packages" in runtime.__file__, runtime.__file__
assert "torch" not in sys.modules, "torch was imported"
assert importlib.util.find_spec("torch") is None, "torch is installed"
print(f"{platform.machine()}: onnxruntime {onnxruntime.__version__} "
      f"{onnxruntime.get_available_providers()}, mujoco {mujoco.__version__}, "
      f"duet from {runtime.__file__.rsplit('/', 2)[0]}")
EOF
) && import_ok=true || import_ok=false
unnoise <<<"$imports"
check "import" "${imports##*$'\n'}" "$import_ok"

# ------------------------------------------------------------------ 3. parity
say "duet export check bundles/reference (ONNX Runtime CPU, aarch64)"
rm -rf "$ROOTFS$SRC" && mkdir -p "$ROOTFS$SRC"
cp -r "$REPO/configs" "$REPO/bundles" "$ROOTFS$SRC/"
parity_ok=true
in_root env -C "$SRC" duet export check bundles/reference --config configs/sim.yaml --repeat 3 \
    2>&1 | tee "$CACHE/parity.log" | unnoise || parity_ok=false
n_ok=$(grep -cE '  ok$' "$CACHE/parity.log" || true)
n_models=$(grep -cE '  (ok|FAIL)$' "$CACHE/parity.log" || true)
check "parity" "duet export check: $n_ok of $n_models models within tolerance of fp32" \
    "$parity_ok"

# ------------------------------------------------------------------ 4. the stack
say "duet run --config configs/sim.yaml --duration $DURATION (sim + follower + planner)"
echo "relaxed for emulation:"; printf '  --set %s\n' "${RELAXED[@]}"
echo "  --ready-timeout 600: start-up (imports, sessions, the first frame) takes minutes"
echo "  GALLIUM_DRIVER=softpipe: Mesa's llvmpipe JIT crashes under qemu-user; softpipe does not"
SETS=(--set run_dir=/tmp/duet-run --set "bundle.path=$SRC/bundles/reference")
for s in "${RELAXED[@]}"; do SETS+=(--set "$s"); done
rm -rf "$ROOTFS/tmp/duet-run" "$ROOTFS/tmp/summary.json"
t_run=$SECONDS
run_ok=true
in_root env -C "$SRC" MUJOCO_GL=egl GALLIUM_DRIVER=softpipe duet run --config configs/sim.yaml \
    "${SETS[@]}" --duration "$DURATION" --ready-timeout 600 --summary-json /tmp/summary.json 2>&1 | tee "$CACHE/run.log" \
    | unnoise || run_ok=false
echo "duet run took $((SECONDS - t_run)) s in all (start-up and shutdown included)"
cp "$ROOTFS/tmp/summary.json" "$CACHE/" 2>/dev/null || echo '{}' >"$CACHE/summary.json"
cp "$ROOTFS/tmp/duet-run/follower-summary.json" "$CACHE/" 2>/dev/null \
    || echo '{}' >"$CACHE/follower-summary.json"
mapfile -t verdicts < <(python3 - "$CACHE/summary.json" "$CACHE/follower-summary.json" \
    "$REPO/bundles/reference/manifest.json" "$run_ok" <<'EOF'
import json, sys
s, fs, manifest = (json.load(open(path)) for path in sys.argv[1:4])
run_ok = sys.argv[4] == "true"
f, p, bus, safety = s.get("follower", {}), s.get("planner", {}), s.get("bus", {}), s.get("safety", {})
modes = {k: v for k, v in f.get("mode_counts", {}).items() if v}
codes = s.get("exit_codes", {})
def verdict(ok, name, detail):
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
verdict(run_ok and s.get("outcome", {}).get("ok") and codes and set(codes.values()) == {0}
        and safety.get("faults") == 0 and safety.get("estops") == 0, "stack ran",
        f"duet run exit {'0' if run_ok else 'non-zero'}, {s.get('duration_s')} s, final mode "
        f"{s.get('outcome', {}).get('final_mode')}, exit codes {codes}, faults "
        f"{safety.get('faults')}, estops {safety.get('estops')}")
verdict(f.get("ticks", 0) > 0 and bus.get("reads", 0) > 0, "follower",
        f"{f.get('ticks', 0)} ticks at {f.get('achieved_hz')} of {f.get('target_hz')} Hz "
        f"({f.get('deadline_misses')} late), modes {modes}, bus reads/writes/errors "
        f"{bus.get('reads')}/{bus.get('writes')}/{bus.get('errors')}")
received, dropped = fs.get("plans_received", 0), f.get("dropped_messages", {})
latency_s = (p.get("latency_ms", {}).get("p50", 0) + s.get("plan_delivery_us", {}).get("p50", 0)
             / 1000) / 1000
verdict(p.get("plans", 0) > 0 and received > 0 and not dropped, "plans",
        f"the planner made {p.get('plans', 0)} (inference p50 "
        f"{p.get('stage_ms', {}).get('engines', {}).get('p50', 0) / 1000:.1f} s), the follower "
        f"received {received}, dropped or rejected {dropped or 'none'}")
horizon_s = manifest["horizon"] * manifest["dt_s"]
track = modes.get("TRACK", 0)
if track:
    verdict(True, "track", f"TRACK for {track} ticks, first tracked command "
            f"{s.get('startup', {}).get('first_track_s')} s after start")
elif latency_s >= horizon_s:
    print(f"SKIP  track: plans arrive {latency_s:.1f} s after their observation (p50), later than"
          f" their own horizon ({manifest['horizon']} x {manifest['dt_s']} s): each has run out "
          "on arrival and the follower holds, as it must")
else:
    verdict(False, "track", f"no TRACK although plans arrive within {latency_s:.1f} s, inside "
            f"their {horizon_s:.1f} s horizon")
t = s.get("task", {})
verdict(t.get("episodes", 0) > 0, "episodes",
        f"{t.get('episodes', 0)} sim episodes ended ({t.get('successes', 0)} successes)")
EOF
)
RESULTS+=("${verdicts[@]}")

# ------------------------------------------------------------------ what passed
say "aarch64 under emulation: $((SECONDS - T0)) s in all (Python $PYVER, Debian $SUITE arm64)"
printf '%s\n' "${RESULTS[@]}"
printf '%s\n' "${RESULTS[@]}" >"$CACHE/results.txt"
if ((${#verdicts[@]} == 0)) || printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'; then
    echo "SOME CHECKS FAILED (logs in $CACHE)"; exit 1
fi
echo "ALL CHECKS PASSED ($(printf '%s\n' "${RESULTS[@]}" | grep -c '^SKIP' || true) skipped)"
