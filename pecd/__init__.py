"""pecd: a certified-mail (PEC, RFC 6109) gateway.

The pipeline is visible in the module names: ``submission`` (access point) → ``relay`` →
``reception`` (incoming point) → ``delivery`` (delivery point), joined only by the durable
``queue``. Formats live in a pure core (``envelope``, ``receipts``, ``daticert``, ``smime``,
``cms``, ``tsa``, ``ledger``) that touches no sockets.
"""

__version__ = "0.1.0"
