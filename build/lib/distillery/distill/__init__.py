"""Dataset distillation (KRR-ST): the model pool and the synthetic-set artifact."""
