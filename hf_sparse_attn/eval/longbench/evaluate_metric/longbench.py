"""LongBench / LongBench-E scores as a Hugging Face ``evaluate`` metric, loadable from a local path (no hub)::

    import evaluate
    from hf_sparse_attn.eval.longbench.evaluate_metric import METRIC_PATH
    metric = evaluate.load(METRIC_PATH, "hotpotqa")   # config name = LongBench task
    metric.compute(predictions=["Paris"], references=[["Paris", "Paris, France"]])
    # {'score': 100.0}; with lengths=[...] also {'0-4k': .., '4-8k': .., '8k+': ..} (LongBench-E buckets)

Scores are computed by hf_sparse_attn.eval.longbench.score (official metrics, first-line rule, max over answers,
mean x 100, rounded to two decimals).
"""

import datasets
import evaluate

from hf_sparse_attn.eval.longbench.score import score_task, score_task_e
from hf_sparse_attn.eval.longbench.tasks import get_task

_CITATION = """@inproceedings{bai2024longbench, title={LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding}, author={Bai, Yushi and others}, booktitle={ACL}, year={2024}}"""

_DESCRIPTION = "LongBench (v1) task score, reproducing the official scorer (rouge, difflib fuzzy ratio, jieba)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of model outputs (str).
    references: list of lists of reference answers (str).
    all_classes: class names (trec, lsht only).
    lengths: optional list of the samples' `length` fields; adds LongBench-E bucket scores.
Returns:
    {"score": float in [0, 100]} (+ "0-4k", "4-8k", "8k+" with lengths; None for an empty bucket).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LongBench(evaluate.Metric):
    def _info(self):
        if self.config_name in (None, "", "default"):
            raise ValueError("pass the LongBench task as the config name, e.g. evaluate.load(path, 'hotpotqa')")
        get_task(self.config_name)  # clear error for an unknown task
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, all_classes=None, lengths=None):
        records = [{"pred": p, "answers": list(r), "all_classes": all_classes} for p, r in zip(predictions, references)]
        out = {"score": score_task(self.config_name, records)}
        if lengths is not None:
            if len(lengths) != len(records):
                raise ValueError(f"lengths has {len(lengths)} entries for {len(records)} predictions")
            for record, length in zip(records, lengths):
                record["length"] = length
            out.update(score_task_e(self.config_name, records))
        return out
