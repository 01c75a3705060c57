"""Definitions the agent and the coordinator share: names, tokens, certificate pins, logging."""

VERSION = "0.1.0"
PROTOCOL_VERSION = 1
