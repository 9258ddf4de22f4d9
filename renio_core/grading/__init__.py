"""Grading completions: math answers, and code run in an OS sandbox."""
