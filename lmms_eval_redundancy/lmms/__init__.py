"""The lmms-eval side: the ``llava_redundancy`` model, its entry point and the token ledger."""
