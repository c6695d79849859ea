"""In-context-learning probes on toy tasks (docs/icl.md).

- linear_regression: Garg et al. 2022's prompts (x_1, y_1, ..., x_k, y_k, x_query) and their baselines;
- regression_transformer: the engine's transformer blocks between a read-in and a read-out projection, trained on
  those prompts;
- linear_attention: one linear self-attention layer vs one gradient-descent step (von Oswald et al. 2023);
- induction: the ICL score over training on repeated random sequences (Olsson et al. 2022);
- task_vectors: a task vector taken from demonstrations and patched into a bare query (Hendel et al. 2023);
- plots: the optional matplotlib figures.
"""
