"""distributed-training: miners train one GPT-2 together over hivemind; validators verify and score them."""

__version__ = "0.1.0"

# Bumped when the miner/validator wire protocol changes incompatibly.
PROTOCOL_VERSION = 1
