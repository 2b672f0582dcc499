"""The zoo's lm-evaluation-harness datasets, read from the files expertbits ships (no hub, no
network): the task YAMLs beside this file name these functions as their `custom_dataset`.

Perplexity protocol (the `expertbits_ppl_*` tasks): a held-out text is cut into documents of
consecutive whole lines, each ending at the first line end after `DOC_CHARS` characters (the last
one may be shorter). lm-eval scores each document with `loglikelihood_rolling`: disjoint windows
of the model's maximum length, every token predicted once from the tokens before it in its window,
the first from the prefix token. It reports word and byte perplexity and bits per byte, summed
over all documents (not averaged per document).
"""

from __future__ import annotations

from functools import partial

DOC_CHARS = 2000


def documents(text: str, chars: int = DOC_CHARS) -> list[str]:
    docs, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chars:
            docs.append("".join(current))
            current, size = [], 0
    if current:
        docs.append("".join(current))
    return docs


def _split(rows: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def supersense(**_metadata) -> dict:
    """The WordNet noun-supersense test glosses: `gloss`, `label` (an index into the YAML's choices)."""
    from expertbits.zoo import corpora

    labels = corpora.SUPERSENSE_LABELS
    return _split([{"gloss": g, "label": labels.index(label)} for g, label in corpora.supersense_examples("test")])


def _text(name: str, **_metadata) -> dict:
    from expertbits.zoo import read_text

    return _split([{"text": doc} for doc in documents(read_text(f"zoo://text/{name}"))])


# the YAMLs' `custom_dataset: !function expertbits_zoo_data.<name>`: one per held-out text
austen = partial(_text, "austen-heldout")
web = partial(_text, "web-heldout")
python = partial(_text, "python-heldout")
wordnet = partial(_text, "wordnet-supersense-test")
code = partial(_text, "code-heldout")
docs = partial(_text, "docs-heldout")
