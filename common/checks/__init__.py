"""Whole-message checks of node actions, one module per family (membership, storage,
firewall), built from the field validators in common/validation.py. The agent runs them on
every request before its executor does anything."""
