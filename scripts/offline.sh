#!/usr/bin/env bash
# Runs a command in a network namespace whose only interface is loopback: whatever it does, it does without a
# network (the air-gap proof; `make test` runs the suite this way). Where no namespace can be made (not root, no
# `unshare` or `ip`), it says why and runs the command as it is.
set -euo pipefail
if [ "${APPLIANCE_OFFLINE:-}" = 1 ]; then
  exec "$@"
fi
why=""
command -v unshare >/dev/null || why="no unshare command"
[ -n "$why" ] || command -v ip >/dev/null || why="no ip command to bring loopback up"
[ -n "$why" ] || why=$(unshare -n true 2>&1 >/dev/null) || true
if [ -n "$why" ]; then
  echo "offline.sh: cannot make a network namespace here ($why); running with the host's network" >&2
  exec "$@"
fi
# Loopback starts down in a new namespace; servers on 127.0.0.1 need it up.
exec unshare -n -- env APPLIANCE_OFFLINE=1 sh -c 'ip link set lo up && exec "$@"' offline "$@"
