from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.document_stores.in_memory import InMemoryDocumentStore

from routehead.integrations.haystack import RouteheadRanker

store = InMemoryDocumentStore()
store.write_documents([Document(content="Jupiter is a gas giant."),
                       Document(content="Statins lower LDL cholesterol and heart-attack risk."),
                       Document(content="Regular exercise reduces cardiovascular risk.")])
pipe = Pipeline()
pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=10))
pipe.add_component("ranker", RouteheadRanker(top_k=2, method="route"))  # RouteHead, embedded default model
pipe.connect("retriever.documents", "ranker.documents")  # BM25 scores become the first-stage scores

query = "What lowers the risk of heart disease?"
for doc in pipe.run({"retriever": {"query": query}, "ranker": {"query": query}})["ranker"]["documents"]:
    print(f"{doc.score:.3f} {doc.meta['routed_heads']} {doc.content}")
