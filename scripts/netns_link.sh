#!/bin/sh
# Emulated wide-area links between network namespaces; see comms/netns.py.
#   scripts/netns_link.sh up 4 --rate 10mbit --delay 50ms --loss 0.1%
#   scripts/netns_link.sh up 4 --rates 100mbit,10mbit,10mbit,2mbit --delays 0ms,50ms,50ms,50ms
#   scripts/netns_link.sh exec isl0 python -m island run island.toml
#   scripts/netns_link.sh status
#   scripts/netns_link.sh down
set -e
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" -m comms.netns "$@"
