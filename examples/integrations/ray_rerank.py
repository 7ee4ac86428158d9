import ray

from routehead.integrations.ray import rerank_dataset, write_trec_run

rows = [{"query_id": "q1", "query": "What lowers the risk of heart disease?", "doc_ids": ["d1", "d2", "d3"],
         "docs": ["Jupiter is a gas giant.", "Statins lower LDL cholesterol and heart-attack risk.",
                  "Regular exercise reduces cardiovascular risk."],
         "first_stage_scores": [1.2, 7.5, 6.1]}]
# one model per actor; on a GPU cluster: concurrency=<number of GPUs>, num_gpus=1
ranked = rerank_dataset(ray.data.from_items(rows), method="route", concurrency=1, batch_size=8).materialize()
for row in ranked.iter_rows():
    print(row["query_id"], list(row["ranked_doc_ids"]), [round(s, 3) for s in row["scores"]], row["heads"])
write_trec_run(ranked, "routehead.trec", run_name="routehead")
