#!/usr/bin/env bash
# The containerd version matrix: one place that knows which containerd each version line is,
# builds it (first run only) and writes its config. Used by the rig (tests/rig/rig.sh), the
# private containerd of the store conformance suite (testkit/src/containerd.rs), bench/ and the
# kubelet cluster tier.
#
#   containerd.sh lines                 the version lines, default first (2.3 4 1.7 1.6 order
#                                       is: default, then the rest)
#   containerd.sh default               the default line (the 2.x LTS)
#   containerd.sh version LINE          the pinned version of LINE (1.6 = Debian's package)
#   containerd.sh bin LINE              build (first run) or find containerd, ctr and
#                                       containerd-shim-runc-v2 of LINE; prints their directory
#   containerd.sh config LINE ROOT STATE SOCKET CERTS_D [KEY=VALUE...]
#                                       print a config.toml for LINE (config version 2 for 1.x,
#                                       3 for 2.x: the plugin names differ). Keys:
#                                         snapshotter=native|overlayfs (default native)
#                                         discard_unpacked_layers=true|false (default false)
#                                         config_path=on|off (off: no registry.config_path, the
#                                           misconfiguration the daemon must detect)
#                                         concurrent_layer_fetch_buffer=BYTES (2.x transfer
#                                           service: one layer as parallel Range requests)
#                                         max_concurrent_downloads=N
#                                         cri=on|off (default on)
#
# Lines: 1.6 is Debian's containerd (/usr/bin); 1.7, 2.3 and 2.4 are built from the Go module
# proxy through the wrapper modules 1.7/, 2.3/ and 2.4/ (go.mod + go.sum pin them), cached in
# ${SPECULUM_CACHE:-$HOME/.cache/speculum}/containerd/<version>/. runc is Debian's everywhere.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${SPECULUM_CACHE:-$HOME/.cache/speculum}/containerd"
DEFAULT_LINE=2.3

log() { echo "containerd.sh: $*" >&2; }

version_of() { # LINE
  case "$1" in
    1.6) echo "v1.6.20-debian" ;;
    1.7) echo "v1.7.35" ;;
    2.3) echo "v2.3.7" ;;
    2.4) echo "v2.4.2" ;;
    *)
      log "unknown containerd line '$1' (known: 1.6 1.7 2.3 2.4)"
      exit 2
      ;;
  esac
}

module_of() { # LINE
  case "$1" in
    1.*) echo "github.com/containerd/containerd" ;;
    *) echo "github.com/containerd/containerd/v2" ;;
  esac
}

build_one() { # DIR NAME PACKAGE TAGS LDFLAGS
  local dir="$1" name="$2" pkg="$3" tags="$4" ldflags="$5" cache="$6"
  [ -x "$cache/$name" ] && return 0
  command -v go >/dev/null || { log "go is needed to build $name"; exit 1; }
  local start=$SECONDS
  log "building $name from $pkg (first run only; minutes on 2 cores)"
  # Build next to the target and rename: a killed build never leaves a half binary behind.
  # no_btrfs: the btrfs snapshotter needs libbtrfs headers (cgo) and no test uses it.
  (cd "$dir" && go build -trimpath -tags "$tags" -ldflags="-s -w $ldflags" \
    -o "$cache/.$name.tmp" "$pkg")
  mv -f "$cache/.$name.tmp" "$cache/$name"
  log "built $name in $((SECONDS - start)) s"
  echo "$name $((SECONDS - start))" >>"$cache/build-times"
}

bin() { # LINE
  local line="$1" version
  version="$(version_of "$line")"
  if [ "$line" = 1.6 ]; then
    command -v containerd >/dev/null || { log "Debian's containerd is not installed (scripts/setup.sh)"; exit 1; }
    dirname "$(command -v containerd)"
    return 0
  fi
  local cache="$CACHE_ROOT/$version" mod
  mod="$(module_of "$line")"
  mkdir -p "$cache"
  # Several test binaries may ask at once; one builds, the others wait for it.
  exec 9>"$cache/.lock"
  flock 9
  local x="-X $mod/version.Version=$version -X $mod/version.Revision=speculum-test -X $mod/version.Package=$mod"
  local tags="no_btrfs urfave_cli_no_docs"
  build_one "$HERE/$line" containerd "$mod/cmd/containerd" "$tags" "$x" "$cache"
  build_one "$HERE/$line" containerd-shim-runc-v2 "$mod/cmd/containerd-shim-runc-v2" "$tags no_grpc" "$x" "$cache"
  build_one "$HERE/$line" ctr "$mod/cmd/ctr" "$tags" "$x" "$cache"
  flock -u 9
  echo "$cache"
}

config() { # LINE DIR [KEY=VALUE...]
  local line="$1" dir="$2"
  shift 2
  local socket="$dir/containerd.sock" snapshotter=overlayfs discard=false config_path=""
  local buffer="" downloads="" cri=on level=info kv
  for kv in "$@"; do
    case "$kv" in
      socket=/*) socket="${kv#*=}" ;;
      config_path=/*) config_path="${kv#*=}" ;;
      cri=on | cri=off) cri="${kv#*=}" ;;
      snapshotter=native | snapshotter=overlayfs) snapshotter="${kv#*=}" ;;
      discard_unpacked_layers=true | discard_unpacked_layers=false) discard="${kv#*=}" ;;
      concurrent_layer_fetch_buffer=*) buffer="${kv#*=}" ;;
      max_concurrent_downloads=*) downloads="${kv#*=}" ;;
      log_level=debug | log_level=info | log_level=warn) level="${kv#*=}" ;;
      *)
        log "unknown or malformed config key '$kv'"
        exit 2
        ;;
    esac
  done
  version_of "$line" >/dev/null
  [[ $dir == /* ]] || { log "DIR must be an absolute path: $dir"; exit 2; }
  [[ $buffer =~ ^[0-9]*$ && $downloads =~ ^[0-9]*$ ]] ||
    { log "concurrent_layer_fetch_buffer and max_concurrent_downloads take numbers"; exit 2; }
  # NRI listens on one machine-wide socket (/var/run/nri/nri.sock) when enabled (the 2.x
  # default): several private containerds would fight over it, and nothing here uses NRI.
  local disabled='"io.containerd.nri.v1.nri"'
  case "$line" in
    1.*)
      [ -z "$buffer" ] || { log "concurrent_layer_fetch_buffer needs containerd 2.x"; exit 2; }
      [ "$cri" = on ] || disabled="$disabled, \"io.containerd.grpc.v1.cri\""
      common_config 2 "$dir" "$socket" "$level" "$disabled"
      [ "$cri" = on ] || return 0
      cat <<EOF
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
${downloads:+  max_concurrent_downloads = $downloads}
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "$snapshotter"
  discard_unpacked_layers = $discard
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "$dir/cni/bin"
  conf_dir = "$dir/cni/conf"
[plugins."io.containerd.grpc.v1.cri".registry]
${config_path:+  config_path = \"$config_path\"}
EOF
      ;;
    *)
      [ "$cri" = on ] || disabled="$disabled, \"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\""
      common_config 3 "$dir" "$socket" "$level" "$disabled"
      # The transfer service (CRI pulls through it since 2.1) takes download settings from its
      # own plugin: a CRI max_concurrent_downloads other than 3 would silently switch CRI back
      # to the local pull path (containerd docs/cri/config.md, "automatic fallback").
      cat <<EOF
[plugins."io.containerd.transfer.v1.local"]
${downloads:+  max_concurrent_downloads = $downloads}
${buffer:+  concurrent_layer_fetch_buffer = $buffer}
EOF
      [ "$cri" = on ] || return 0
      cat <<EOF
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "$snapshotter"
  discard_unpacked_layers = $discard
[plugins."io.containerd.cri.v1.images".registry]
${config_path:+  config_path = \"$config_path\"}
[plugins."io.containerd.cri.v1.runtime"]
  disable_apparmor = true
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["$dir/cni/bin"]
  conf_dir = "$dir/cni/conf"
EOF
      ;;
  esac
}

# common_config VERSION DIR SOCKET LEVEL DISABLED: what every private containerd needs: its own
# root, state, sockets and opt dir, no debug or metrics listener (see notes/containerd-rig.md).
common_config() {
  cat <<EOF
# Generated by tests/containerd/containerd.sh for containerd $(version_of "$line").
version = $1
root = "$2/root"
state = "$2/state"
disabled_plugins = [$5]

[grpc]
  address = "$3"
[ttrpc]
  address = "$3.ttrpc"
[debug]
  address = ""
  level = "$4"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$2/opt"
EOF
}

case "${1:-}" in
  lines)
    echo "$DEFAULT_LINE"
    for l in 2.4 1.7 1.6; do echo "$l"; done
    ;;
  default) echo "$DEFAULT_LINE" ;;
  version) version_of "${2:?line}" ;;
  bin) bin "${2:?line}" ;;
  config)
    shift
    [ $# -ge 2 ] || { log "usage: config LINE DIR [KEY=VALUE...]"; exit 2; }
    config "$@"
    ;;
  *)
    sed -n '2,27p' "$0" >&2
    exit 2
    ;;
esac
