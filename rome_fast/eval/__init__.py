"""Evaluation of edits: CounterFact and zsRE loaders, the reference's metrics, and the runner.

    from rome_fast.eval import load_counterfact, evaluate
    records = load_counterfact("counterfact-edit.json", limit=100)
    summary = evaluate(mt, "counterfact", records, hparams, "results/cf100")
"""
from .datasets import (DATA_URLS, EvalRecord, counterfact_record, download, load_counterfact,
                       load_dataset, load_known_facts, load_zsre, zsre_record)
from .generation import TfIdf, generate, load_attribute_snippets, n_gram_entropy, word_tokenize
from .metrics import (aggregate, counterfact_case_scores, counterfact_probs, harmonic_mean,
                      target_nll, token_accuracy, zsre_case_scores, zsre_correct)
from .cases import case_metrics, format_summary, summarize
from .runner import evaluate, rome_editor

__all__ = ["DATA_URLS", "EvalRecord", "TfIdf", "aggregate", "case_metrics", "counterfact_case_scores",
           "counterfact_probs", "counterfact_record", "download", "evaluate", "format_summary",
           "generate", "harmonic_mean", "load_attribute_snippets", "load_counterfact",
           "load_dataset", "load_known_facts", "load_zsre", "n_gram_entropy", "rome_editor",
           "summarize", "target_nll", "token_accuracy", "word_tokenize", "zsre_case_scores",
           "zsre_correct", "zsre_record"]
