"""Quality measurements of hybrid models: perplexity, pass-key retrieval, recency profiles, lm-eval."""
