"""The PEC formats: pure, no sockets, no disk, no wall clock. Envelopes, receipts, daticert.xml,
MIME composition and parsing, header checks.
"""
