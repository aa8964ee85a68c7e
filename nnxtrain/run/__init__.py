"""The run directory on disk: `directory` (creating it, config.yaml, run_info.json),
`lock` (one run per directory), `records` (the JSONL records and their cut-back on resume).
Imports config and the leaves only.
"""
