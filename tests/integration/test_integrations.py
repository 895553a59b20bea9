"""The framework adapters against the live apps: each searches the embedded default (`base_url`) sync and
async, inside a real pipeline of its framework with no LLM, and shows a degraded answer of the faults
app in its documents' metadata; the LangChain one also passes langchain-tests' standard retriever tests.

Few and quick on purpose: no app of their own, a handful of searches each.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from haystack import Pipeline
from haystack.components.builders import PromptBuilder
from haystack.core.errors import PipelineRuntimeError
from langchain_core.documents import Document
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_tests.integration_tests import RetrieversIntegrationTests
from llama_index.core import get_response_synthesizer
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine

from actors.errors import NoRetrieverAvailable
from serve_app.client import RagClient
from serve_app.integrations import haystack as hs
from serve_app.integrations import langchain as lc
from serve_app.integrations import llama_index as li

pytestmark = pytest.mark.integration
QUERY = "vitamin D and multiple sclerosis"
DEGRADED = ["quick", "failing"]  # the faults app: quick answers, failing always fails


@pytest.fixture(autouse=True)
def no_haystack_telemetry(monkeypatch):
    monkeypatch.setattr("haystack.telemetry._telemetry.telemetry", None)  # nothing leaves the machine


@pytest.fixture(scope="module")
def expected(base_url) -> list[str]:
    """The ids ragfan itself answers for QUERY, top 5: what every adapter must hand over, in order."""
    with RagClient(url=base_url) as client:
        r = client.search(QUERY, top_k=5)
    assert len(r.results) == 5 and not r.degraded, r
    return [result.id for result in r.results]


def found_by_ragfan(metadata: dict, ids: list[str]) -> None:
    assert metadata["ragfan_id"] in ids and metadata["ragfan_sources"] and metadata["ragfan_degraded"] is False
    assert {"retriever", "rank", "score"} <= set(metadata["ragfan_sources"][0]) and metadata["ragfan_missing"] == {}


# -- the embedded default app ------------------------------------------------------------------------
def test_langchain_sync_async_and_in_a_chain(base_url, expected):
    retriever = lc.RagfanRetriever(url=base_url, k=5)
    docs = retriever.invoke(QUERY)
    assert [d.id for d in docs] == expected and docs[0].page_content
    found_by_ragfan(docs[0].metadata, expected)
    assert [d.id for d in asyncio.run(retriever.ainvoke(QUERY, k=2))] == expected[:2]

    def context(docs: list[Document]) -> str:
        return "\n".join(f"[{d.metadata['ragfan_id']}] {d.page_content}" for d in docs)

    chain = ({"context": retriever | RunnableLambda(context), "question": RunnablePassthrough()}
             | PromptTemplate.from_template("Answer from the context.\n{context}\nQuestion: {question}"))
    prompt = chain.invoke(QUERY).to_string()
    assert all(f"[{i}]" in prompt for i in expected) and prompt.endswith(QUERY)
    assert asyncio.run(chain.ainvoke(QUERY)).to_string() == prompt


def test_llama_index_sync_async_and_in_a_query_engine(base_url, expected):
    retriever = li.RagfanRetriever(url=base_url, similarity_top_k=5)
    nodes = retriever.retrieve(QUERY)
    assert [n.node.node_id for n in nodes] == expected and nodes[0].score == nodes[0].node.metadata["ragfan_score"]
    found_by_ragfan(nodes[0].node.metadata, expected)
    assert [n.node.node_id for n in asyncio.run(retriever.aretrieve(QUERY))] == expected

    # MockLLM answers with the prompt it was given: the answer shows what the synthesizer put into it
    engine = RetrieverQueryEngine(retriever, response_synthesizer=get_response_synthesizer(llm=MockLLM()))
    response = engine.query(QUERY)
    assert [n.node.node_id for n in response.source_nodes] == expected
    assert nodes[0].node.get_content() in str(response) and "ragfan_sources" not in str(response)
    response = asyncio.run(engine.aquery(QUERY))
    assert [n.node.node_id for n in response.source_nodes] == expected


def test_haystack_sync_async_and_in_a_pipeline(base_url, expected):
    retriever = hs.RagfanRetriever(url=base_url, top_k=5)
    docs = retriever.run(QUERY)["documents"]
    assert [d.id for d in docs] == expected and docs[0].score == docs[0].meta["ragfan_score"]
    found_by_ragfan(docs[0].meta, expected)
    assert [d.id for d in asyncio.run(retriever.run_async(QUERY, top_k=2))["documents"]] == expected[:2]

    pipeline = Pipeline()
    pipeline.add_component("retriever", retriever)
    pipeline.add_component("prompt", PromptBuilder(
        template="{% for d in documents %}[{{ d.id }}] {{ d.content }}\n{% endfor %}Question: {{ query }}",
        required_variables=["documents", "query"]))
    pipeline.connect("retriever.documents", "prompt.documents")
    data = {"retriever": {"query": QUERY, "top_k": 3}, "prompt": {"query": QUERY}}
    prompt = pipeline.run(data)["prompt"]["prompt"]
    assert [line[1:line.index("]")] for line in prompt.splitlines()[:3]] == expected[:3] and prompt.endswith(QUERY)
    assert asyncio.run(pipeline.run_async(data))["prompt"]["prompt"] == prompt


# -- degraded and failed answers (the faults app) ----------------------------------------------------
def test_a_degraded_answer_is_in_every_documents_metadata_and_logged_once(faults_url, caplog):
    caplog.set_level(logging.WARNING, logger="serve_app.integrations")
    metadata = [
        *(d.metadata for d in lc.RagfanRetriever(url=faults_url, retrievers=DEGRADED).invoke(QUERY)),
        *(d.metadata for d in asyncio.run(lc.RagfanRetriever(url=faults_url).ainvoke(QUERY, retrievers=DEGRADED))),
        *(n.node.metadata for n in li.RagfanRetriever(url=faults_url, retrievers=DEGRADED).retrieve(QUERY)),
        *(d.meta for d in hs.RagfanRetriever(url=faults_url).run(QUERY, retrievers=DEGRADED)["documents"]),
    ]
    assert len(metadata) >= 4 and all(m["ragfan_degraded"] for m in metadata)
    for m in metadata:
        assert set(m["ragfan_missing"]) == {"failing"} and m["ragfan_sources"][0]["retriever"] == "quick"
        # an error, or once its circuit opened after failing again and again, skipped with that reason
        state = m["ragfan_missing"]["failing"]
        assert (state["status"], bool(state["error"])) in {("error", True), ("skipped", True)}, state
    warnings = [r for r in caplog.records if r.name == "serve_app.integrations"]
    assert len(warnings) == 4 and all("failing" in r.getMessage() for r in warnings)


def test_a_failed_search_raises_ragfans_error(faults_url):
    with pytest.raises(NoRetrieverAvailable) as info:
        lc.RagfanRetriever(url=faults_url, retrievers=["failing"]).invoke(QUERY)
    assert "failing" in info.value.reasons
    pipeline = Pipeline()
    pipeline.add_component("retriever", hs.RagfanRetriever(url=faults_url, retrievers=["failing"]))
    with pytest.raises(PipelineRuntimeError) as wrapped:
        pipeline.run({"retriever": {"query": QUERY}})
    assert isinstance(wrapped.value.__cause__, NoRetrieverAvailable)


# -- langchain-tests' standard retriever tests ---------------------------------------------------------
class TestLangChainStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def live(self, base_url) -> None:
        self.url = base_url

    @property
    def retriever_constructor(self) -> type[lc.RagfanRetriever]:
        return lc.RagfanRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"url": self.url}

    @property
    def retriever_query_example(self) -> str:
        return QUERY
