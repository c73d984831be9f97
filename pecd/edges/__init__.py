"""Network edges: thin asyncio adapters for SMTP, LMTP and HTTP around the points.
"""
