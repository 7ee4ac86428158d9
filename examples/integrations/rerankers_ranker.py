from rerankers import Reranker

import routehead.integrations.rerankers  # noqa: F401  (registers model_type="routehead")

ranker = Reranker("smollm2-135m", model_type="routehead", method="route", verbose=0)
results = ranker.rank("What lowers the risk of heart disease?",
                      ["Jupiter is a gas giant.", "Statins lower LDL cholesterol and heart-attack risk.",
                       "Regular exercise reduces cardiovascular risk."], doc_ids=["d1", "d2", "d3"],
                      first_stage_scores=[1.2, 7.5, 6.1])  # the retriever's scores (the default router routes them)
for r in results.top_k(2):
    print(r.rank, f"{r.score:.3f}", r.doc_id, r.document.metadata["routed_heads"], r.text)
