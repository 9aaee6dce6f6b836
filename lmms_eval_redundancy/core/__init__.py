"""The pieces every layer shares: budgets, visual and selection types, the method registry, splicing."""
