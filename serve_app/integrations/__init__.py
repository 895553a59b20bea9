"""ragfan as a retriever of LangChain, LlamaIndex and Haystack: thin adapters over `RagClient`.

    module (class RagfanRetriever)        what it is                       install
    serve_app.integrations.langchain      a langchain_core BaseRetriever   pip install "ragfan[langchain]"
    serve_app.integrations.llama_index    a llama_index.core BaseRetriever pip install "ragfan[llamaindex]"
    serve_app.integrations.haystack       a Haystack 2.x-style @component  pip install "ragfan[haystack]"

Each maps its framework's call to one ragfan search (sync or native async) and each result to the
framework's document: the text as its content, and in its metadata the document's own metadata plus
ragfan's id, fused score, sources and, for a degraded answer, which retrievers were missing and why
(`common.py` builds that metadata once for all three). docs/INTEGRATIONS.md is the reference.

This package imports no framework: only the adapter module you import does, and it raises an
ImportError naming the extra to install when its framework is missing.
"""
