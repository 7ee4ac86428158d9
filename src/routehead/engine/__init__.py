"""The engine: text -> prompt with exact spans -> one forward pass with attention capture -> calibrated token
scores of the computed heads -> each head set aggregated (:mod:`.aggregate`)."""
