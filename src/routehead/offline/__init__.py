"""Offline data: BEIR collections, the first stage (BM25 or a candidate pool), the dense baseline, the score store
of whole collections' passes, and views over it (:mod:`.views`)."""
