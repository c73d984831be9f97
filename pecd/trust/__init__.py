"""Whom pecd trusts: CMS signatures and RFC 3161 timestamps, S/MIME, the dev PKI, certificate paths
and verdicts, revocation, the provider index.
"""
