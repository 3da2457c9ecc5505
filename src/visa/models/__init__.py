"""Model definitions used by embedded agents (weights come from pip packages)."""
