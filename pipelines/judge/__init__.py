"""LLM-as-a-judge for character role-play, after Character-LLM (Shao et al., 2023).

    from pipelines.judge import Judge, Interaction, score_live
    judge = Judge.open(workspace, "gpt-4o-mini", persona="ayane")
    async for verdict in score_live(judge, messages, message_id=reply_id):
        ...                                   # one Verdict per criterion, as each finishes
    await judge.aclose()

Modules: prompt (the judge prompt: full profile, anchors, delimiters), parse (final score,
G-Eval weighting), providers (OpenAI, OpenAI-compatible, llama.cpp), runner (the Judge:
concurrency, retries, cache, store), live (console API), batch (data files), batch_api
(the OpenAI Batch API for large runs), calibrate
(the calibration run: agreement with human labels), calibration (the stored reports, the
status the console shows and the curate job's gate). Never imports torch or textual.
"""

from pipelines.judge.calibrate import agreement, calibrate
from pipelines.judge.calibration import (
    Agreement,
    CalibrationReport,
    CalibrationStatus,
    calibration_path,
    calibration_problems,
    calibration_status,
    load_calibration,
    save_calibration,
)
from pipelines.judge.live import score_live, score_sync
from pipelines.judge.parse import ParsedScore, TokenLogprob, parse_score, weighted_score
from pipelines.judge.providers import (
    Completion,
    LlamaCppProvider,
    OpenAIProvider,
    Provider,
    ProviderError,
    make_provider,
)
from pipelines.judge.runner import Judge, load_criteria
from pipelines.judge.verdict import Interaction, JudgeError, Verdict

__all__ = [
    "Agreement",
    "CalibrationReport",
    "CalibrationStatus",
    "Completion",
    "Interaction",
    "Judge",
    "JudgeError",
    "LlamaCppProvider",
    "OpenAIProvider",
    "ParsedScore",
    "Provider",
    "ProviderError",
    "TokenLogprob",
    "Verdict",
    "agreement",
    "calibrate",
    "calibration_path",
    "calibration_problems",
    "calibration_status",
    "load_calibration",
    "load_criteria",
    "make_provider",
    "parse_score",
    "save_calibration",
    "score_live",
    "score_sync",
    "weighted_score",
]
