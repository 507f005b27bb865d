#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use, only those missing (real clients and servers:
# mosquitto, libcoap, redis, nginx, wrk, curl; strace to watch the store's system calls). Needs root or sudo;
# does nothing when all are present.
set -euo pipefail
declare -A want=(
  [mosquitto]=mosquitto [mosquitto_pub]=mosquitto-clients [coap-client-notls]=libcoap3-bin
  [redis-server]=redis-server [nginx]=nginx-light [wrk]=wrk [curl]=curl [taskset]=util-linux [strace]=strace
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${want[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
