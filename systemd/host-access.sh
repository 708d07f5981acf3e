# shellcheck shell=bash
# Sourced by the verify scripts that build a Debian root (verify-aarch64.sh; verify-in-container.sh
# may use it too): reach the host's package registries from inside that root the way the host
# does. Bash; defines functions only.

# The Debian mirror the host's apt uses (first deb URI of its sources), else deb.debian.org.
host_debian_mirror() {
    local uri
    uri=$(grep -hsoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
        | grep -oE 'https?://[^[:space:]]+' | head -n1) || true
    echo "${uri:-http://deb.debian.org/debian}"
}

# Copy into ROOT what name resolution, TLS and the package clients need: resolv.conf and
# hosts, the host's CA bundle (TLS to the registries may pass a proxy that only it trusts),
# apt's Acquire settings (proxy, release-date checks), and a pip.conf carrying the host's
# network index settings (local file:// indexes and find-links dirs are the host's own
# platform's wheels and are left out). Prints the pip.conf it wrote.
root_copy_host_access() {
    local root=$1 f
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    cp -L /etc/hosts "$root/etc/hosts"
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca-bundle.crt"
    for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
        [[ -f $f ]] && grep -qE '^[[:space:]]*Acquire' "$f" \
            && cp "$f" "$root/etc/apt/apt.conf.d/90host-$(basename "$f")"
    done
    python3 - "$root/etc/pip.conf" <<'EOF'
import configparser, os, sys
keys = ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "retries")
conf = {}
home = os.path.expanduser("~")
files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", f"{home}/.pip/pip.conf",
         f"{home}/.config/pip/pip.conf", os.environ.get("PIP_CONFIG_FILE", "")]
for path in files:  # pip's own order: later files win, the environment last
    p = configparser.ConfigParser()
    if path and p.read(path):
        for section in ("global", "install"):
            conf.update({k: p[section][k] for k in keys if p.has_option(section, k)})
conf.update({k: os.environ[v] for k in keys
             if (v := "PIP_" + k.upper().replace("-", "_")) in os.environ})
for k in ("index-url", "extra-index-url"):  # network indexes only
    urls = [u for u in conf.get(k, "").split() if u.startswith(("http://", "https://"))]
    conf.pop(k, None) if not urls else conf.__setitem__(k, " ".join(urls))
conf["cert"] = "/etc/ssl/certs/host-ca-bundle.crt"
text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
open(sys.argv[1], "w").write(text)
print(text, end="")
EOF
}
