"""The benchmarks' official rule-based scorers, loaded from the packages that ship them, as test oracles.

Installed without their dependency trees (`pip install --no-deps`, see `make test`): lighteval 0.13.0,
lmms-eval 0.7.3 and lm-eval 0.4.13 pull CUDA torch, vLLM-era pins or API clients. Only the modules that hold
the rules are loaded, by path where a package's `__init__` imports the heavy parts:
- lighteval: metrics/utils/extractive_match_utils.py and math_comparison.py (the `metrics` packages' __init__
  is skipped; `tasks.requests.Doc` is a stand-in, used for typing only; its pin latex2sympy2_extended==1.0.6
  is waived for math-verify's newer copy, which the same functions call);
- lmms-eval: tasks/{mathvista,mathvision,mathverse,mmstar,olympiadbench} and tasks/_task_utils/mcq_extract.py
  (the `tasks` package's __init__ is skipped; the GPT clients they import are stand-ins that answer nothing,
  so every number is the rule-based part's). MATH-V's eval_utils imports `latex2sympy2` (antlr 4.7.2, which
  cannot sit beside math-verify's antlr 4.13): latex2sympy2_extended's `latex2sympy` stands in for it. Their
  OlympiadBench evaluator calls sympy's `parse_latex` (antlr 4.11): the same stand-in;
- lm-eval: filters/extraction.py (RegexFilter) and api/metrics.py (exact_match_hf_evaluate), imported as they are.
Each `*_score(row, completion)` returns the official verdict as 1.0/0.0.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

from lmmr1_lite.benchmarks import gpqa


def _root(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec and spec.origin else None


def _stub_package(name: str, path: Path) -> None:
    """Register `name` as a package whose submodules load from `path`, without running its __init__."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _latex_value(text):
    from latex2sympy2_extended import latex2sympy

    return latex2sympy(text)


# ------------------------------------------------------------------------------------------------
# lighteval: MATH500 (latex_gold_metric's extraction targets) and GPQA (gpqa_instruct_metric)
# ------------------------------------------------------------------------------------------------
@functools.cache  # loaded once: the patches below are not stacked
def _lighteval():
    root = _root("lighteval")
    if root is None:
        return None
    import lighteval.utils.imports as imports

    available = imports.is_package_available
    imports.is_package_available = lambda p: True if "latex2sympy2_extended" in str(p) else available(p)
    _stub_package("lighteval.metrics", root / "metrics")
    _stub_package("lighteval.metrics.utils", root / "metrics" / "utils")
    _stub_package("lighteval.tasks", root / "tasks")
    _stand_in("lighteval.tasks.requests", Doc=object)
    from lighteval.metrics.utils import extractive_match_utils as extract
    from lighteval.metrics.utils.math_comparison import compare_gold_target
    from lighteval.utils.language import Language

    return extract, compare_gold_target, Language


def lighteval_math500(row: dict, completion: str) -> float:
    extract, compare, language = _lighteval()
    doc = types.SimpleNamespace(choices=[""])
    gold_res = extract.get_extraction_regexes(doc, [extract.LatexExtractionConfig()], language.ENGLISH)
    pred_res = extract.get_extraction_regexes(
        doc, [extract.ExprExtractionConfig(), extract.LatexExtractionConfig(boxed_match_priority=0)], language.ENGLISH)
    gold = extract.extract_target_from_pred(f"\\boxed{{{row['answer']}}}", gold_res, "first_match")
    pred = extract.extract_target_from_pred(completion, pred_res, "first_match")
    return float(compare(gold, pred, 5))


def lighteval_gpqa(row: dict, completion: str) -> float:
    extract, compare, language = _lighteval()
    doc = types.SimpleNamespace(choices=list("ABCD"))
    config = [extract.IndicesExtractionConfig(prefix_for_extraction="NativeLetters", try_extract_without_anchor=True)]
    regexes = extract.get_extraction_regexes(doc, config, language.ENGLISH)
    gold = extract.extract_target_from_pred(gpqa.options(row)[1], regexes)
    pred = extract.extract_target_from_pred(completion, regexes)
    return float(compare(gold, pred, 6))


# ------------------------------------------------------------------------------------------------
# lmms-eval task utilities
# ------------------------------------------------------------------------------------------------
class _NoJudge:
    """Stands in for lmms-eval's GPT server: every request fails, so only the rule-based part decides."""

    def evaluate(self, request):
        return types.SimpleNamespace(success=False, content="", error="no judge in tests")


@functools.cache
def _lmms_tasks() -> Path | None:
    root = _root("lmms_eval")
    if root is None:
        return None
    _stub_package("lmms_eval.tasks", root / "tasks")
    for task in ("mathvista", "mathvision", "mathverse", "mmstar", "olympiadbench", "_task_utils"):
        _stub_package(f"lmms_eval.tasks.{task}", root / "tasks" / task)
    _stand_in("lmms_eval.llm_judge", Request=lambda **kw: types.SimpleNamespace(**kw),
              ServerConfig=lambda **kw: types.SimpleNamespace(**kw), get_server=lambda **kw: _NoJudge())
    _stand_in("lmms_eval.verifiers", VerificationPipeline=object)
    _stand_in("lmms_eval.verifiers.extractors", StripReasoningExtractor=object)
    _stand_in("lmms_eval.verifiers.openai", OpenAIVerifier=object)
    _stand_in("latex2sympy2", latex2sympy=_latex_value)
    # MathVerse's evaluator builds an API client at import time
    if "openai" not in sys.modules and importlib.util.find_spec("openai") is None:
        _stand_in("openai", OpenAI=types.SimpleNamespace, AzureOpenAI=types.SimpleNamespace)
    from loguru import logger

    logger.remove()  # the stand-in judge's failures are expected: no log lines
    return root / "tasks"


@functools.cache
def _mathvista():
    if _lmms_tasks() is None:
        return None
    from lmms_eval.tasks.mathvista.mathvista_evals import MathVistaEvaluator

    return MathVistaEvaluator(quick_extract=False)  # mathvista_testmini.yaml: quick_extract false


def lmms_mathvista(row: dict, completion: str, stated: str | None = None) -> float:
    """mathvista_process_results: the rule-based extraction; where it needs GPT, `stated` (the answer the
    completion states, what a perfect extractor returns) stands in for GPT's extraction; then their
    normalize_extracted_answer and safe_equal."""
    evaluator = _mathvista()
    problem = {"question_type": row["question_type"], "answer_type": row["answer_type"], "query": row.get("query", ""),
               "choices": row.get("choices"), "precision": row.get("precision") or 0}
    extraction = evaluator.extract_answer(completion.strip(), problem, False) or (stated or "")
    prediction = evaluator.normalize_extracted_answer(extraction, problem["choices"], problem["question_type"],
                                                      problem["answer_type"], int(problem["precision"]))
    return float(evaluator.safe_equal(prediction, row["answer"]))


def lmms_mathvision(row: dict, completion: str) -> float:
    if _lmms_tasks() is None:
        return None
    from lmms_eval.tasks.mathvision import utils

    doc = {"answer": row["answer"], "options": row.get("options") or [], "question": row["question"]}
    return float(utils.mathvision_process_results(doc, [completion])["mathvision_standard_eval"]["scores"][0])


def lmms_mathverse(row: dict, completion: str, stated: str | None = None) -> float:
    """MathVerseEvaluator.score_answer with quick_match (its only rule-based path: the extraction equals
    `answer`); the extraction is GPT's there, `stated` (the answer the completion states) stands in for it."""
    if _lmms_tasks() is None:
        return None
    from lmms_eval.tasks.mathverse.mathverse_evals import MathVerseEvaluator

    extraction = completion.strip() if stated is None else stated
    return float(bool(MathVerseEvaluator().score_answer(row["question_for_eval"], row["answer"], extraction,
                                                        quick_match=True)))


def lmms_mmstar(row: dict, completion: str) -> float:
    if _lmms_tasks() is None:
        return None
    from lmms_eval.tasks.mmstar import utils

    return float(utils.exact_match(completion, row["answer"]))


def lmms_olympiadbench(row: dict, completion: str) -> float:
    """olympiadbench_process_results (en_utils.py): the text after "final answer is", spaces removed, judged
    against the first gold; `error` passed as floats, as OpenBMB's judge.py does (lmms-eval passes the string,
    which makes every tolerance fail with a TypeError)."""
    if _lmms_tasks() is None:
        return None
    from lmms_eval.tasks.olympiadbench import olympiadbench_evals

    olympiadbench_evals.parse_latex = _latex_value
    evaluator = olympiadbench_evals.OlympiadBenchEvaluator()
    error = row.get("error")
    precision = [float(e) for e in str(error).split(",")] if error else 1e-8
    prediction = completion.strip().split("final answer is")[-1]
    prediction = prediction.replace('"', "").replace("\n", "").replace(" ", "").strip(".").strip("。")
    return float(bool(evaluator.judge(prediction, row["final_answer"][0], precision)))


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness: gsm8k-cot-zeroshot's two filters and its exact_match
# ------------------------------------------------------------------------------------------------
LM_EVAL_FILTERS = {"strict-match": ("The answer is (\\-?[0-9\\.\\,]+).", 0),
                   "flexible-extract": ("(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}


def lm_eval_gsm8k(row: dict, completion: str, name: str) -> float:
    if _root("lm_eval") is None:
        return None
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    pattern, group = LM_EVAL_FILTERS[name]
    filtered = list(RegexFilter(regex_pattern=pattern, group_select=group).apply([[completion]], [row]))[0][0]
    result = exact_match_hf_evaluate(predictions=[filtered], references=[row["answer"]], ignore_case=True,
                                     ignore_punctuation=False, regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])
    return float(result["exact_match"])


def available() -> dict[str, bool]:
    return {name: _root(name) is not None for name in ("lighteval", "lmms_eval", "lm_eval")}


__all__ = ["available", "lighteval_gpqa", "lighteval_math500", "lm_eval_gsm8k", "lmms_mathverse", "lmms_mathvision",
           "lmms_mathvista", "lmms_mmstar", "lmms_olympiadbench"]
