"""Scoring hooks for distill's lm-eval tasks (referenced from the YAMLs with ``!function``).

The grading itself lives in ``distill.eval.scoring`` (math-verify behind distill's grader), so
``lm_eval --include_path evals --tasks distill_aime24`` and ``distill eval`` score alike.
"""

from distill.eval.scoring import score_problem
from distill.grading import normalize_gold
from distill.prompts import INSTRUCTION


def _normalise(doc: dict, index: int) -> dict:
    """Any source's fields -> {id, problem, answer}: hub sets and local files name them differently."""
    problem = doc.get("problem") or doc.get("question")
    if problem is None or "answer" not in doc:
        raise ValueError(f"row {index}: needs 'problem' (or 'question') and 'answer', has {sorted(doc)}")
    doc_id = doc.get("id", doc.get("unique_id", index))
    return {"id": str(doc_id), "problem": problem, "answer": normalize_gold(doc["answer"])}


def process_docs(dataset):
    return dataset.map(_normalise, with_indices=True, remove_columns=dataset.column_names)


def doc_to_text(doc: dict) -> str:
    return f"{doc['problem']}\n{INSTRUCTION}"


def keep_all(resps, docs):
    """Filter that keeps every one of the k samples (lm-eval's default keeps only the first)."""
    return resps


def process_results(doc: dict, results: list) -> dict:
    responses = list(results[0])  # keep_all: one entry holding the k responses
    scored = score_problem(responses, doc["answer"])
    n, c = scored["n"], scored["correct"]
    return {
        "pass@1": c / n,
        "pass@k": float(c > 0),  # unbiased pass@k with k = n
        "cons@k": scored["cons_correct"],
        "graded": scored["samples"],  # per-sample grades, read back by `distill eval`
    }


def count_samples(items: list) -> int:
    """Aggregation of ``graded``: how many samples were scored."""
    return sum(len(x) for x in items)
