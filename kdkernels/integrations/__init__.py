"""Integrations with the trainers LLM distillation runs on (imported on use; each needs its package installed:
``pip install "kdkernels[llm]"``). docs/trainers.md describes them.

- ``kdkernels.integrations.transformers``: ``KDTrainer``, a ``transformers.Trainer`` that trains a causal
  LM student on ``ce_weight * CE + distill_weight * (any kdkernels method)`` against a teacher model, on the
  fused-linear path (neither model's [tokens, V] logits exist), off- or on-policy, its options in ``KDConfig``.
- ``kdkernels.integrations.trl``: ``patch_trl()`` puts the fused-linear loss under TRL's ``DistillationTrainer``,
  and ``GKDTrainer`` is TRL's GKD trainer on the fused-linear path, both with any method (``method=``).
"""
