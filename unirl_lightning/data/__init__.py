"""Prompt specs (GenEval format), the seeded prompt generator, and UniRL's questions and answers."""

from unirl_lightning.data.prompts import (
    GENEVAL_TASK_COUNTS,
    english_plural,
    generate_specs,
    geneval_plural,
    geneval_vocabulary,
    make_spec,
    prompt_for,
    split_specs,
    world_vocabulary,
)
from unirl_lightning.data.qa import QUESTIONS, Grade, all_answer_words, answer_for, grade_answer, question_for
from unirl_lightning.data.specs import SpecError, load_official_specs, load_specs, save_specs, validate_spec
from unirl_lightning.data.datamodule import OnPolicyDataModule, PromptBatch, PromptGroupStream
from unirl_lightning.data.reasoning import ReasoningDataModule
from unirl_lightning.data.rendered import FlowSceneDataModule, RenderedSceneDataModule, RenderedSceneStream
