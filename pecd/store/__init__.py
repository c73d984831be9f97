"""Storage: the only modules that hold SQL (queue, ledger, accounts, reading, API and revocation
state) and durable file writes.
"""
