"""coordctl: the operator's CLI over the coordinator's admin API."""
