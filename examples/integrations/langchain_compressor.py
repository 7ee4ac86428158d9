from langchain_core.documents import Document

from routehead.integrations.langchain import RouteheadCompressor

# RouteHead on the embedded default model; the retriever's metadata["score"] is the first-stage score
compressor = RouteheadCompressor(top_n=2, method="route")
docs = [Document(page_content="Jupiter is a gas giant.", metadata={"score": 1.2}),
        Document(page_content="Statins lower LDL cholesterol and heart-attack risk.", metadata={"score": 7.5}),
        Document(page_content="Regular exercise reduces cardiovascular risk.", metadata={"score": 6.1})]
for doc in compressor.compress_documents(docs, "What lowers the risk of heart disease?"):
    print(f"{doc.metadata['relevance_score']:.3f} {doc.metadata['routed_heads']} {doc.page_content}")
# in a chain: ContextualCompressionRetriever(base_compressor=compressor, base_retriever=your_retriever)
