"""One executor per action kind. Each validates its request, reads the current state, acts
only on the difference (or, in a dry run, says what it would run), and reports.

The registry that maps an Action's kind to its executor is `registry.EXECUTORS`.
"""
