#!/usr/bin/env bash
# Runs the miner under pm2 and keeps it updated from the branch this checkout tracks:
#
#   pm2 start run_miner.sh --name NAME -- [--update.interval SECONDS] <dt-miner flags>
#
# Starts pm2 process NAME-neuron (.venv/bin/dt-miner <flags>) and polls the remote every
# --update.interval seconds (env UPDATE_INTERVAL, default 1200). See docs/operating-updates.md.
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/scripts/auto_update.sh" miner "$@"
