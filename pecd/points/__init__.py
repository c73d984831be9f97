"""The RFC 6109 points and the stages around them: access, relay, reception, delivery, timeouts,
reading evidence, notices and fallback.
"""
