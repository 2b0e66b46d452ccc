"""Evaluation: synthetic models for tests and benchmarks, and measurement scripts."""
