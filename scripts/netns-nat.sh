#!/usr/bin/env bash
# Builds (or removes) a small internet in Linux network namespaces, for the
# NAT end-to-end test (tests/nat.rs) and for trying NAT traversal by hand:
#
#   PREFIX-pub     "the internet": the coordinator and a public node.
#                  10.77.1.1 on the link to router 1, 10.77.2.1 to router 2;
#                  forwards between them.
#   PREFIX-nat1    a home router: 10.77.1.2 outside, 192.168.1.1 inside,
#                  iptables MASQUERADE on the outside (a NAT: inbound
#                  connections nobody asked for go nowhere).
#   PREFIX-home1   a volunteer behind it: 192.168.1.2, default via the router.
#   PREFIX-nat2 / PREFIX-home2: the same with 10.77.2.x and 192.168.2.x.
#
# Only outbound connections leave a home namespace, as behind a real home
# router. Needs root, iproute2 and iptables (`.ci/run` installs iptables).
#
#   scripts/netns-nat.sh up   [PREFIX]   (default PREFIX: brnat)
#   scripts/netns-nat.sh down [PREFIX]
#   ip netns exec brnat-home1 barnraise node --coordinator /ip4/10.77.1.1/tcp/...
set -euo pipefail

action="${1:-}"
prefix="${2:-brnat}"
pub="$prefix-pub"

down() {
    for ns in "$pub" "$prefix-nat1" "$prefix-home1" "$prefix-nat2" "$prefix-home2"; do
        ip netns del "$ns" 2>/dev/null || true
    done
}

in_ns() {
    local ns="$1"
    shift
    ip netns exec "$ns" "$@"
}

# A veth pair between two namespaces, each end with its address, both up.
link() {
    local ns_a="$1" if_a="$2" addr_a="$3" ns_b="$4" if_b="$5" addr_b="$6"
    ip link add "$if_a" type veth peer name "$if_b"
    ip link set "$if_a" netns "$ns_a"
    ip link set "$if_b" netns "$ns_b"
    in_ns "$ns_a" ip addr add "$addr_a" dev "$if_a"
    in_ns "$ns_a" ip link set "$if_a" up
    in_ns "$ns_b" ip addr add "$addr_b" dev "$if_b"
    in_ns "$ns_b" ip link set "$if_b" up
}

up() {
    command -v iptables >/dev/null || {
        echo "netns-nat: iptables is not installed (apt-get install iptables)" >&2
        exit 2
    }
    down
    ip netns add "$pub"
    in_ns "$pub" ip link set lo up
    in_ns "$pub" sysctl -qw net.ipv4.ip_forward=1
    for i in 1 2; do
        local nat="$prefix-nat$i" home="$prefix-home$i"
        ip netns add "$nat"
        ip netns add "$home"
        in_ns "$nat" ip link set lo up
        in_ns "$home" ip link set lo up
        # The router's outside link, to the internet; its inside link, to the home.
        link "$pub" "${prefix}p$i" "10.77.$i.1/24" "$nat" "${prefix}o$i" "10.77.$i.2/24"
        in_ns "$nat" ip route add default via "10.77.$i.1"
        link "$nat" "${prefix}i$i" "192.168.$i.1/24" "$home" "${prefix}h$i" "192.168.$i.2/24"
        in_ns "$home" ip route add default via "192.168.$i.1"
        # NAT: outbound is rewritten to the router's address; inbound that
        # is not a reply is dropped.
        in_ns "$nat" sysctl -qw net.ipv4.ip_forward=1
        in_ns "$nat" iptables -t nat -A POSTROUTING -o "${prefix}o$i" -j MASQUERADE
        in_ns "$nat" iptables -A FORWARD -i "${prefix}o$i" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        in_ns "$nat" iptables -A FORWARD -i "${prefix}o$i" -j DROP
        # Like a home router, the router itself drops what nobody asked for.
        # Dropped before conntrack confirms it, an early packet of a hole
        # punch leaves no entry behind that would make the router pick
        # another port for the home's own packets to the same peer.
        in_ns "$nat" iptables -A INPUT -i "${prefix}o$i" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        in_ns "$nat" iptables -A INPUT -i "${prefix}o$i" -j DROP
    done
}

case "$action" in
    up) up ;;
    down) down ;;
    *)
        echo "usage: $0 up|down [PREFIX]" >&2
        exit 2
        ;;
esac
