"""Running a model with a method: loading, prompts, the pruning engine, and what each batch costs."""
