"""trainer: trains the planned model, checkpoints, resumes, measures held-out perplexity."""
