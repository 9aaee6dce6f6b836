"""Built-in pruning methods; importing this package registers them."""

from lmms_eval_redundancy.methods import codebook, divprune, fastervlm, fastv, none, pooling, random  # noqa: F401
