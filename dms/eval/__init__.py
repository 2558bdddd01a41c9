"""Quality evaluation: long-context tasks from corpus text, training-free KV baselines, and the suite.

    from dms.eval import EvalConfig, EvalData, DMSSystem, PolicySystem, evaluate_system
"""
from .baselines import POLICIES, PolicyCache, make_cache, prepare_policy_model
from .suite import DMSSystem, EvalConfig, EvalData, PolicySystem, evaluate_system, greedy_generate, perplexity_and_kl, run_tasks
from .tasks import TASKS, Example, PretrainMix, TaskBuilder, answer_correct, read_corpus, token_stream

__all__ = ["POLICIES", "PolicyCache", "make_cache", "prepare_policy_model", "DMSSystem", "EvalConfig", "EvalData",
           "PolicySystem", "evaluate_system", "greedy_generate", "perplexity_and_kl", "run_tasks", "TASKS", "Example",
           "PretrainMix", "TaskBuilder", "answer_correct", "read_corpus", "token_stream"]
