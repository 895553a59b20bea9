#!/usr/bin/env python3
"""Build the ragfan demo data files from a local copy of BEIR SciFact.

Outputs (written to --out):
  corpus.jsonl        500 SciFact abstracts, copied unchanged.
  demo_queries.jsonl  the first 150 SciFact test claims with their relevant doc ids.
  domain.jsonl        250 further abstracts labelled with a coarse biomedical domain.

Selection rules (deterministic, stdlib only):
  * Test query ids are taken in order of first appearance in qrels/test.tsv; the first
    150 are used. Every doc they cite goes into corpus.jsonl first (in qrels order), then
    the corpus is filled up to 500 docs with other docs in SciFact corpus order.
  * domain.jsonl takes the remaining docs in corpus order. Each doc gets the domain whose
    keywords occur most often in title + " " + text (ties: the earlier domain in DOMAINS);
    docs with no keyword hit are skipped, as are docs whose domain already has
    PER_DOMAIN docs. Stops at DOMAIN_TOTAL docs.

The persona, triples and aliases files are hand-written and are not produced here.
"""

import argparse
import csv
import json
import os
import re
from collections import OrderedDict

N_QUERIES = 150
CORPUS_SIZE = 500
DOMAIN_TOTAL = 250
PER_DOMAIN = 36

# Keywords are matched case-insensitively at word starts, so "tumor" also matches "tumors"
# and "tumorigenesis". Keep them specific enough that one hit is meaningful.
DOMAINS = OrderedDict([
    ("oncology", [
        "cancer", "tumor", "tumour", "carcinoma", "oncogen", "metasta", "leukemia",
        "leukaemia", "lymphoma", "melanoma", "chemotherap", "malignan", "glioma",
        "sarcoma", "neoplas",
    ]),
    ("immunology", [
        "immun", "t cell", "b cell", "t-cell", "b-cell", "antibod", "antigen", "cytokine",
        "interleukin", "macrophage", "lymphocyte", "inflammat", "autoimmun", "dendritic",
        "neutrophil", "treg",
    ]),
    ("neuroscience", [
        "neuron", "neural", "brain", "cortex", "cortical", "synap", "alzheimer",
        "parkinson", "dopamin", "hippocamp", "cognit", "neurodegenerat", "axon",
        "dementia", "schizophren", "depress",
    ]),
    ("cardiovascular", [
        "cardiac", "cardiovascular", "heart", "coronary", "myocardi", "atheroscler",
        "hypertens", "blood pressure", "stroke", "arter", "vascular", "atrial",
        "thrombo",
    ]),
    ("infectious-disease", [
        "infect", "virus", "viral", "bacteri", "hiv", "malaria", "plasmodium",
        "tuberculosis", "mycobacter", "influenza", "pathogen", "antibiotic", "vaccin",
        "sepsis", "hepatitis",
    ]),
    ("genetics", [
        "gene", "genom", "genetic", "mutation", "polymorphism", "allele", "heritab",
        "chromosom", "gwas", "genotyp", "locus", "loci", "epigenet", "methylation",
        "dna", "transcription factor",
    ]),
    ("metabolism", [
        "metabol", "insulin", "diabet", "obes", "glucose", "lipid", "cholesterol",
        "adipos", "fatty acid", "mitochondri", "lipoprotein", "body mass index",
        "triglycerid", "vitamin",
    ]),
])

DOMAIN_PATTERNS = {
    name: re.compile(r"\b(?:" + "|".join(re.escape(k) for k in kws) + r")", re.IGNORECASE)
    for name, kws in DOMAINS.items()
}


def classify(doc):
    """Return (domain, hit counts) for a doc; domain is None when nothing matched."""
    haystack = doc["title"] + " " + doc["text"]
    counts = {name: len(pat.findall(haystack)) for name, pat in DOMAIN_PATTERNS.items()}
    best = max(counts.values())
    if best == 0:
        return None, counts
    # Ties go to the domain listed first in DOMAINS.
    domain = next(name for name in DOMAINS if counts[name] == best)
    return domain, counts


def read_corpus(path):
    """Return a list of (raw_line, parsed_doc) in file order."""
    docs = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line:
                docs.append((line, json.loads(line)))
    return docs


def read_qrels(path):
    """Return an OrderedDict query-id -> [corpus-id, ...] in file order."""
    qrels = OrderedDict()
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        assert header[:2] == ["query-id", "corpus-id"], header
        for row in reader:
            if not row:
                continue
            qid, did = row[0].strip(), row[1].strip()
            if int(row[2]) > 0:
                qrels.setdefault(qid, []).append(did)
    return qrels


def read_queries(path):
    queries = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                queries[q["_id"]] = q["text"]
    return queries


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            if isinstance(row, str):
                fh.write(row + "\n")
            else:
                fh.write(json.dumps(row) + "\n")  # ASCII escapes, like SciFact


def check(out):
    """Verify the demo files: ids, disjointness, and that each triple quotes its abstract."""
    def load(name):
        with open(os.path.join(out, name), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]
    corpus = {d["_id"]: d for d in load("corpus.jsonl")}
    domain = load("domain.jsonl")
    errors = []
    if set(corpus) & {d["_id"] for d in domain}:
        errors.append("corpus.jsonl and domain.jsonl overlap")
    for q in load("demo_queries.jsonl"):
        errors += ["query {}: doc {} not in corpus".format(q["_id"], d)
                   for d in q["relevant"] if d not in corpus]
    for i, t in enumerate(load("triples.jsonl"), 1):
        doc = corpus.get(t["doc_id"])
        if doc is None:
            errors.append(f"triple {i}: doc {t['doc_id']} not in corpus")
        elif t["text"] not in doc["title"] + " " + doc["text"] or len(t["text"]) > 300:
            errors.append(f"triple {i}: text not a <=300-char quote of doc {t['doc_id']}")
    for e in errors:
        print("ERROR", e)
    print(f"check: {len(errors)} errors")
    return 1 if errors else 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scifact", default=os.path.normpath(
        os.path.join(here, "..", "..", "..", "..", "shared", "datasets", "scifact")),
        help="BEIR SciFact directory (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    ap.add_argument("--out", default=here, help="output directory (default: this script's dir)")
    ap.add_argument("--check", action="store_true",
                    help="only verify the files already in --out (incl. triples.jsonl)")
    args = ap.parse_args()
    if args.check:
        raise SystemExit(check(args.out))

    corpus = read_corpus(os.path.join(args.scifact, "corpus.jsonl"))
    by_id = {doc["_id"]: (raw, doc) for raw, doc in corpus}
    qrels = read_qrels(os.path.join(args.scifact, "qrels", "test.tsv"))
    queries = read_queries(os.path.join(args.scifact, "queries.jsonl"))

    # 1. Demo queries and the docs they cite.
    demo_qids = list(qrels)[:N_QUERIES]
    demo_queries = []
    selected = []  # doc ids, in output order
    seen = set()
    for qid in demo_qids:
        demo_queries.append({"_id": qid, "text": queries[qid], "relevant": qrels[qid]})
        for did in qrels[qid]:
            if did not in by_id:
                raise SystemExit(f"qrels doc {did} missing from corpus")
            if did not in seen:
                seen.add(did)
                selected.append(did)

    # 2. Fill the demo corpus with other docs in corpus order.
    for _, doc in corpus:
        if len(selected) >= CORPUS_SIZE:
            break
        if doc["_id"] not in seen:
            seen.add(doc["_id"])
            selected.append(doc["_id"])

    # 3. Domain-labelled docs from the rest of the corpus.
    per_domain = {name: 0 for name in DOMAINS}
    domain_rows = []
    for _, doc in corpus:
        if len(domain_rows) >= DOMAIN_TOTAL:
            break
        if doc["_id"] in seen:
            continue
        domain, _ = classify(doc)
        if domain is None or per_domain[domain] >= PER_DOMAIN:
            continue
        per_domain[domain] += 1
        domain_rows.append({"_id": doc["_id"], "title": doc["title"], "text": doc["text"],
                            "metadata": {"domain": domain}})

    os.makedirs(args.out, exist_ok=True)
    # corpus.jsonl keeps the source lines byte for byte.
    write_jsonl(os.path.join(args.out, "corpus.jsonl"), [by_id[d][0] for d in selected])
    write_jsonl(os.path.join(args.out, "demo_queries.jsonl"), demo_queries)
    write_jsonl(os.path.join(args.out, "domain.jsonl"), domain_rows)

    n_cited = len({d for q in demo_qids for d in qrels[q]})
    print(f"corpus.jsonl: {len(selected)} docs ({n_cited} cited by the {len(demo_qids)} demo queries)")
    print(f"demo_queries.jsonl: {len(demo_queries)} queries")
    print(f"domain.jsonl: {len(domain_rows)} docs {json.dumps(per_domain)}")


if __name__ == "__main__":
    main()
