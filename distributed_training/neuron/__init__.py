"""The neurons: a miner and a validator, the parts both stand on, and their entry and exit."""
