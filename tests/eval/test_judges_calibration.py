"""Re-measure the shipped judge figures on PyRIT's human refusal labels (docs/methods.md §4.3; docs/evaluation.md
*Judges*).

The keyword figures in ``MEASURED_QUALITY`` and the embedding threshold in ``PYRIT_CALIBRATION`` are copied into
every results file; this test fails when a lexicon, the matcher or the embedder changes them.
"""

from __future__ import annotations

import pytest

from safetypatch.eval.judges.embedding import PYRIT_CALIBRATION, EmbeddingJudge
from safetypatch.eval.judges.keyword import MEASURED_QUALITY, KeywordConfig, KeywordJudge
from safetypatch.eval.metrics import judge_quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labels():
    catalog = pytest.importorskip("safetypatch.data.catalog")
    dataset = catalog.load_dataset("refusal-labels")
    rows = dataset.rows
    return [r.prompt for r in rows], [r.response or "" for r in rows], [r.answer == 1 for r in rows]


@pytest.mark.parametrize(("lexicon", "match"), [
    ("v2", "prefix"), ("v2", "anywhere"), ("v1", "prefix"), ("v1", "anywhere"), ("gcg_short", "prefix"),
    ("gcg_short", "anywhere")])
def test_keyword_figures_match_the_shipped_ones(labels, lexicon, match):
    prompts, responses, y = labels
    judge = KeywordJudge(KeywordConfig(lexicon=lexicon, match=match))
    measured = judge_quality([bool(v.refused) for v in judge.judge(prompts, responses)], y)
    assert measured == MEASURED_QUALITY[judge.judge_id]


def test_embedding_calibration_matches_the_shipped_one(labels):
    prompts, responses, y = labels
    calibration = EmbeddingJudge().calibrate(prompts, responses, y, folds=5, seed=0)
    assert calibration.threshold == pytest.approx(PYRIT_CALIBRATION.threshold, abs=1e-4)
    # One borderline cosine may move with the CPU's float kernels; more than that is a real change.
    for got, shipped in ((calibration.quality, PYRIT_CALIBRATION.quality),
                         (calibration.keyword_only, PYRIT_CALIBRATION.keyword_only)):
        assert got.n == shipped.n == 169
        assert got.accuracy == pytest.approx(shipped.accuracy, abs=1.01 / 169)
        assert got.recall == pytest.approx(shipped.recall, abs=1.01 / 109)
    assert calibration.quality.accuracy > calibration.keyword_only.accuracy + 0.2
