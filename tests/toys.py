"""Toy inputs shared by the selection, training and api tests: five short documents (doc 0 answers "which enzyme
digests starch?"), and the identity and head pool of a toy model for RouterConfig."""

from __future__ import annotations

DOCS = ["Amylase digests starch into sugar.", "Paris is in France.", "Lipase digests fat.",
        "Starch is made of glucose.", "The sky is blue."]


def toy_identity(L=2, H=2, hidden=8):
    return {"model": "toy", "num_layers": L, "num_heads": H, "hidden_size": hidden}


def toy_pool(L=2, H=2):
    return [[lay, h] for lay in range(L) for h in range(H)]
