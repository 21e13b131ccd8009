"""The label vocabulary: label files and prompt templates, their cached text features, emoji, reloads."""
