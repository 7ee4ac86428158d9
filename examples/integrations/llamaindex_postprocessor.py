from llama_index.core.schema import NodeWithScore, TextNode

from routehead.integrations.llamaindex import RouteheadRerank

# RouteHead on the embedded default model; each node's retriever score is the first-stage score
rerank = RouteheadRerank(top_n=2, keep_retrieval_score=True, method="route")
nodes = [NodeWithScore(node=TextNode(text="Jupiter is a gas giant."), score=1.2),
         NodeWithScore(node=TextNode(text="Statins lower LDL cholesterol and heart-attack risk."), score=7.5),
         NodeWithScore(node=TextNode(text="Regular exercise reduces cardiovascular risk."), score=6.1)]
for n in rerank.postprocess_nodes(nodes, query_str="What lowers the risk of heart disease?"):
    print(f"{n.score:.3f} {n.node.metadata['routed_heads']} {n.node.get_content()}")
# in a query engine: index.as_query_engine(similarity_top_k=20, node_postprocessors=[rerank])
