"""The `larimar` command: one table of verbs (`larimar.cli.main.COMMANDS`), one module per command family.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input (one line on stderr).
"""
