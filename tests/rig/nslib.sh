#!/usr/bin/env bash
# nslib.sh — the process, namespace and link helpers both namespace topologies share: the
# rig (tests/rig/rig.sh) and the kubelet cluster (tests/cluster/cluster.sh) source this file.
#
# One job: bounded waits, processes recorded by PID and stopped only when still ours, leftover
# processes in our namespaces, veth links into a bridge namespace with optional tc tbf. It
# holds no topology of its own; the sourcing script sets, before calling anything:
#   NS_DIR        the state directory (PIDs go to NS_DIR/pids/NAME.pid)
#   NS_OWNER      a string the command line of every process we started contains (so a reused
#                 PID after a crash is never signalled)
#   NS_PREFIX     the prefix of every network namespace we created
#   NS_BRIDGE     the namespace holding the bridge br0 that attach_ns plugs into
#   NS_TBF_BURST  the tbf burst (must exceed rate/HZ and a GSO packet)
#   NS_POLL       seconds between two tries of poll_until
# and defines log (one line to stderr).

# poll_until SECONDS DESCRIPTION CMD...: runs CMD every NS_POLL seconds until it succeeds;
# fails after SECONDS. The only way these scripts wait for anything.
poll_until() {
	local limit=$1 what=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || { log "timed out after ${limit}s waiting for $what"; return 1; }
		sleep "$NS_POLL"
	done
}

# --- processes -----------------------------------------------------------------------------------
pid_file() { echo "$NS_DIR/pids/$1.pid"; }

# owned_pid NAME: prints the recorded PID if that process is alive and is still ours (its
# command line contains NS_OWNER).
owned_pid() {
	local f pid
	f=$(pid_file "$1")
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	[[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$NS_OWNER" || return 1
	echo "$pid"
}

is_running() { owned_pid "$1" >/dev/null; }

pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# all_gone PID...: true when none of the PIDs is alive.
all_gone() {
	local pid
	for pid in "$@"; do
		pid_gone "$pid" || return 1
	done
}

# stop_all SIGNAL TIMEOUT NAME...: signals every recorded process at once (containerd takes a
# second or two to exit; one after another would add up), waits for all (bounded), KILLs the rest.
stop_all() {
	local sig=$1 limit=$2 name pid pids=()
	shift 2
	for name in "$@"; do
		if pid=$(owned_pid "$name"); then
			kill -s "$sig" "$pid" 2>/dev/null || true
			pids+=("$pid")
		fi
	done
	if ((${#pids[@]} > 0)) && ! poll_until "$limit" "$* to exit after SIG$sig" all_gone "${pids[@]}"; then
		kill -s KILL "${pids[@]}" 2>/dev/null || true
		poll_until 10 "$* to die" all_gone "${pids[@]}" || log "warning: some of ${pids[*]} survived SIGKILL"
	fi
	for name in "$@"; do
		rm -f "$(pid_file "$name")"
	done
}

# --- namespaces ----------------------------------------------------------------------------------
# our_namespaces: every network namespace whose name starts with NS_PREFIX.
our_namespaces() { ip netns list | awk -v p="$NS_PREFIX" 'index($1, p) == 1 { print $1 }'; }

# ns_empty NETNS: true when no process lives in NETNS.
ns_empty() { [[ -z $(ip netns pids "$1" 2>/dev/null) ]]; }

# kill_ns_stragglers: anything still inside one of our namespaces was started by us (or by a
# test acting as a node: containers, shims); after the recorded PIDs are stopped, end those too,
# by PID.
kill_ns_stragglers() {
	local ns pids
	for ns in $(our_namespaces); do
		pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
		[[ -n ${pids// /} ]] || continue
		log "ending leftover processes in $ns: $pids"
		# shellcheck disable=SC2086
		kill -s TERM $pids 2>/dev/null || true
		poll_until 10 "leftovers in $ns" ns_empty "$ns" || {
			pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
			# shellcheck disable=SC2086
			[[ -z ${pids// /} ]] || kill -s KILL $pids 2>/dev/null || true
			poll_until 10 "leftovers in $ns to die" ns_empty "$ns" || log "warning: processes survive in $ns"
		}
	done
}

# --- links ---------------------------------------------------------------------------------------
# tbf RATE NETNS DEV: shapes DEV's egress to RATE (no-op when RATE is empty).
tbf() {
	local rate=$1 ns=$2 dev=$3
	[[ -n $rate ]] || return 0
	ip -n "$ns" link set "$dev" gso_max_size 65536 2>/dev/null || true
	tc -n "$ns" qdisc replace dev "$dev" root tbf rate "$rate" burst "$NS_TBF_BURST" latency 100ms
}

# attach_ns NETNS PORT IP RATE: a veth from the bridge (end PORT) into NETNS (end eth0, with IP),
# shaped both ways to RATE. Created in the bridge namespace; nothing touches the host's links.
attach_ns() {
	local ns=$1 port=$2 addr=$3 rate=$4
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip -n "$NS_BRIDGE" link add "$port" type veth peer name eth0 netns "$ns"
	ip -n "$NS_BRIDGE" link set "$port" master br0 up
	ip -n "$ns" addr add "$addr/24" dev eth0
	ip -n "$ns" link set eth0 up
	tbf "$rate" "$NS_BRIDGE" "$port"
	tbf "$rate" "$ns" eth0
}
