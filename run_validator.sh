#!/usr/bin/env bash
# Runs the validator under pm2 and keeps it updated from the branch this checkout tracks:
#
#   pm2 start run_validator.sh --name NAME -- [--update.interval SECONDS] [--update.watch SECONDS] <dt-validator flags>
#
# Starts pm2 process NAME-neuron (.venv/bin/dt-validator <flags>) and polls the remote every
# --update.interval seconds (env UPDATE_INTERVAL, default 1200); after restarting the neuron on a
# new release it watches it for --update.watch seconds (env UPDATE_WATCH, default 600) and rolls
# back a release that crash-loops or does not join the swarm. See docs/operating-updates.md.
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/scripts/auto_update.sh" validator "$@"
