"""Judges (configs/judges/*.yaml) and their criteria (configs/judges/criteria/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config.base import Name, Strict


class JudgePrices(Strict):
    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")


class JudgeConfig(Strict):
    name: Name = Field(description="how jobs and the console name this judge")
    provider: Literal["openai", "openai_compatible", "llama_cpp"] = Field(
        description="OpenAI, another OpenAI-compatible server (base_url), or a local GGUF")
    model: str = Field(description="model name at the provider, or a .gguf path for llama_cpp")
    base_url: str | None = Field(None, description="the server's /v1 URL (openai_compatible)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="the environment variable "
                                    "holding the API key; null: none sent")
    criteria: list[str] = Field(min_length=1, description="the criteria it scores by default")
    few_shot: int = Field(3, ge=0, description="calibration rows shown as anchors per prompt")
    seed: int = Field(0, description="picks the anchors; sent to providers that take a seed")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60, gt=0, description="seconds per request")
    max_retries: int = Field(5, ge=0, description="retries of a failed request")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    logprobs: bool = Field(True, description="ask for token probabilities, for the weighted "
                           "score")
    max_tokens: int = Field(2048, gt=0, description="answer budget: four reasoning steps "
                            "in Japanese need ~600-1200 tokens")
    prices: JudgePrices | None = Field(None, description="USD per million tokens, for the "
                                       "eval job's cost estimate; unset: not priced")
    batch_prices: JudgePrices | None = Field(None, description="USD per million tokens "
                                             "through the Batch API (`batch: true`); unset: "
                                             "half of `prices`")


class Criterion(Strict):
    """An editable judge prompt. Placeholders: {profile} {speech_rules} {examples}
    {interactions} {open} {close} (the per-call random delimiters)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="how judges and jobs name it")
    title: str = Field(description="its name in reports")
    prompt_version: str = Field(description="labels stored verdicts and calibrations; bump "
                                "it when the template changes")
    question: str = Field(description="the question the judge answers, in one line")
    template: str = Field(min_length=1, description="the prompt, with the placeholders")
